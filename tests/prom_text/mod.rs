//! A strict reader of the Prometheus text format (version 0.0.4), for the
//! tests that scrape `/metrics`.

use std::collections::BTreeMap;

/// Checks `text` against the Prometheus text format (version 0.0.4): every
/// sample belongs to a family with one HELP and one TYPE line before it,
/// names and labels are well formed, values are numbers, histograms have
/// `_bucket` series ending in `le="+Inf"` with `_count` equal to it.
/// Returns the samples.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
    };
    let mut help = BTreeMap::new();
    let mut kind: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
            assert!(name_ok(name) && !text.is_empty(), "{}", at());
            assert!(help.insert(name.to_string(), text.to_string()).is_none(), "two HELP lines: {}", at());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
            assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&t), "{}", at());
            assert!(kind.insert(name.to_string(), t.to_string()).is_none(), "two TYPE lines: {}", at());
            continue;
        }
        assert!(!line.starts_with('#'), "an unknown comment: {}", at());
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{}", at()));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("not a number: {}", at())),
        };
        let name = series.split('{').next().unwrap();
        assert!(name_ok(name), "{}", at());
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            let inner =
                labels.strip_prefix('{').and_then(|l| l.strip_suffix('}')).unwrap_or_else(|| panic!("{}", at()));
            // label="value" pairs, values with \" and \\ escapes.
            let mut rest = inner;
            while !rest.is_empty() {
                let (label, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("{}", at()));
                assert!(name_ok(label), "label {label:?}: {}", at());
                let mut end = None;
                let mut escaped = false;
                for (i, c) in after.char_indices() {
                    match (escaped, c) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => {
                            end = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                let end = end.unwrap_or_else(|| panic!("an unterminated label value: {}", at()));
                rest = after[end + 1..].strip_prefix(',').unwrap_or(&after[end + 1..]);
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| kind.get(*f).is_some_and(|k| k == "histogram")))
            .unwrap_or(name);
        assert!(kind.contains_key(family), "no TYPE before the sample: {}", at());
        assert!(help.contains_key(family), "no HELP for the family: {}", at());
        assert!(samples.insert(series.to_string(), value).is_none(), "a series twice: {}", at());
    }
    for (family, k) in &kind {
        if k != "histogram" {
            continue;
        }
        for (series, count) in samples.iter().filter(|(s, _)| s.starts_with(&format!("{family}_count"))) {
            let labels = series.strip_prefix(&format!("{family}_count")).unwrap();
            let inner = labels.trim_start_matches('{').trim_end_matches('}');
            let inf = if inner.is_empty() {
                format!("{family}_bucket{{le=\"+Inf\"}}")
            } else {
                format!("{family}_bucket{{{inner},le=\"+Inf\"}}")
            };
            assert_eq!(samples.get(&inf), Some(count), "{inf} against {series}");
        }
    }
    samples
}
