//! Progress of a long benchmark on stderr: a bar redrawn in place on a
//! terminal, a plain line per finished step otherwise (logs, pipes, CI).
//!
//! Cheap and bounded: it writes only when a step starts or ends, one line
//! of at most `LINE_CHARS_MAX` characters each time.

use std::io::Write;

/// Most characters of one progress line (longer text is cut).
pub const LINE_CHARS_MAX: usize = 120;
/// Cells of the bar.
const BAR_CELLS: usize = 24;

pub struct Progress<W: Write> {
    out: W,
    /// Redraw a bar in place (a terminal) rather than print lines.
    bar: bool,
    /// What the plain lines start with (`sweep: `).
    prefix: String,
    total: usize,
    done: usize,
    /// A bar is on screen and needs a newline before anything else.
    drawn: bool,
}

impl Progress<std::io::Stderr> {
    /// On stderr: a bar if it is a terminal.
    pub fn stderr(prefix: &str, total: usize) -> Self {
        // SAFETY: isatty only reads the descriptor's state.
        let tty = unsafe { libc::isatty(2) } == 1;
        Self::new(std::io::stderr(), tty, prefix, total)
    }
}

impl<W: Write> Progress<W> {
    pub fn new(out: W, bar: bool, prefix: &str, total: usize) -> Self {
        Self { out, bar, prefix: prefix.to_string(), total, done: 0, drawn: false }
    }

    /// A step begins: the bar shows it (plain output waits for its end).
    pub fn start(&mut self, what: &str) {
        if self.bar {
            self.draw(&format!("{what} ..."));
        }
    }

    /// A step ended with `result`.
    pub fn finish(&mut self, what: &str, result: &str) {
        self.done = (self.done + 1).min(self.total.max(1));
        let text = format!("{what}: {result}");
        if self.bar {
            self.draw(&text);
        } else {
            let line = format!("{}{}/{} {text}", self.prefix, self.done, self.total);
            let _ = writeln!(self.out, "{}", cut(&line));
        }
    }

    /// A line of its own (a warning, say), above the bar.
    pub fn note(&mut self, line: &str) {
        if self.drawn {
            let _ = write!(self.out, "\r\x1b[2K");
        }
        let _ = writeln!(self.out, "{}{}", self.prefix, cut(line));
        if self.drawn {
            self.drawn = false;
            self.draw("");
        }
    }

    /// Leaves the bar on screen, ending its line.
    pub fn end(&mut self) {
        if self.drawn {
            let _ = writeln!(self.out);
            self.drawn = false;
        }
        let _ = self.out.flush();
    }

    fn draw(&mut self, text: &str) {
        let total = self.total.max(1);
        let filled = self.done * BAR_CELLS / total;
        let bar: String = "#".repeat(filled) + &"-".repeat(BAR_CELLS - filled);
        let line = format!("{}[{bar}] {}/{} {text}", self.prefix, self.done, self.total);
        let _ = write!(self.out, "\r\x1b[2K{}", cut(&line));
        let _ = self.out.flush();
        self.drawn = true;
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

fn cut(line: &str) -> String {
    line.chars().take(LINE_CHARS_MAX).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_one_per_finished_step() {
        let mut p = Progress::new(Vec::new(), false, "sweep: ", 24);
        p.start("write 64 KiB tcp");
        p.finish("write 64 KiB tcp", "2.31 GB/s");
        p.note("rdma-emu: no target");
        p.end();
        let text = String::from_utf8(p.into_inner()).unwrap();
        assert_eq!(text, "sweep: 1/24 write 64 KiB tcp: 2.31 GB/s\nsweep: rdma-emu: no target\n");
    }

    #[test]
    fn a_bar_redrawn_in_place_and_bounded() {
        let mut p = Progress::new(Vec::new(), true, "sweep: ", 2);
        p.start("write 4 KiB tcp");
        p.finish("write 4 KiB tcp", "1.00 GB/s");
        p.note("a warning");
        p.finish(&"x".repeat(500), "2.00 GB/s");
        p.end();
        let text = String::from_utf8(p.into_inner()).unwrap();
        assert!(text.contains("\r\x1b[2Ksweep: [------------------------] 0/2 write 4 KiB tcp ..."));
        assert!(text.contains("[############------------] 1/2 write 4 KiB tcp: 1.00 GB/s"));
        assert!(text.contains("\r\x1b[2Ksweep: a warning\n"));
        assert!(text.contains("[########################] 2/2 xxx"));
        assert!(text.ends_with('\n'));
        for line in text.split(['\r', '\n']) {
            assert!(line.chars().count() <= LINE_CHARS_MAX + 4, "{line}");
        }
    }
}
