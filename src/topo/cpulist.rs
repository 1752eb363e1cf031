//! The kernel's CPU-list syntax (`0-3,8,10-11`), as found in sysfs `cpulist`
//! files and in `SHARDWIRE_CORES`.

use std::fmt;

/// The highest CPU id we accept. Linux's `NR_CPUS` tops out at 8192; anything
/// beyond that in a list is a typo, not a machine.
pub const CPU_ID_MAX: u32 = 8191;

/// Why a CPU list did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuListError {
    /// The offending list, as given.
    pub input: String,
    /// What is wrong with it.
    pub fault: String,
}

impl fmt::Display for CpuListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad CPU list {:?}: {}", self.input, self.fault)
    }
}

impl std::error::Error for CpuListError {}

/// Parses `0-3,8,10-11` into a sorted list without duplicates.
///
/// Surrounding white space (sysfs files end in a newline) is ignored, and an
/// empty list is valid (memory-only NUMA nodes have one).
///
/// ```
/// use shardwire::topo::cpulist;
/// assert_eq!(cpulist::parse("0-2,8\n").unwrap(), vec![0, 1, 2, 8]);
/// assert!(cpulist::parse("3-1").is_err());
/// ```
pub fn parse(input: &str) -> Result<Vec<u32>, CpuListError> {
    let fail = |fault: String| CpuListError { input: input.to_string(), fault };
    let text = input.trim();
    let mut cpus = Vec::new();
    if text.is_empty() {
        return Ok(cpus);
    }
    for part in text.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (parse_id(lo).map_err(&fail)?, parse_id(hi).map_err(&fail)?),
            None => {
                let id = parse_id(part).map_err(&fail)?;
                (id, id)
            }
        };
        if lo > hi {
            return Err(fail(format!("range {part:?} runs backwards")));
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

fn parse_id(text: &str) -> Result<u32, String> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a CPU number"));
    }
    match text.parse::<u32>() {
        Ok(id) if id <= CPU_ID_MAX => Ok(id),
        _ => Err(format!("CPU {text} is above the limit of {CPU_ID_MAX}")),
    }
}

/// Formats a list of CPU ids in the kernel's compact form (`0-3,8`).
/// The input need not be sorted; duplicates are folded.
///
/// ```
/// assert_eq!(shardwire::topo::cpulist::format(&[8, 0, 1, 2, 2]), "0-2,8");
/// ```
pub fn format(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_singles_and_whitespace() {
        assert_eq!(parse("0-3,8,10-11\n").unwrap(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse(" 5 ").unwrap(), vec![5]);
        assert_eq!(parse("").unwrap(), Vec::<u32>::new());
        assert_eq!(parse("\n").unwrap(), Vec::<u32>::new());
        assert_eq!(parse("3,1,1-2").unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["a", "1-", "-1", "3-1", "1,,2", "0x3", "+1", "9000", "1-99999"] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.input, bad);
            assert!(!err.fault.is_empty());
        }
    }

    #[test]
    fn formats_compactly_and_round_trips() {
        assert_eq!(format(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format(&[7, 5, 6, 5]), "5-7");
        assert_eq!(format(&[]), "");
        for text in ["0-111", "0-55,112-167", "0,2,4,6", "1"] {
            assert_eq!(format(&parse(text).unwrap()), text);
        }
    }
}
