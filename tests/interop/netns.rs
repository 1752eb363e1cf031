//! A second "host" on this machine: a network namespace joined to this one
//! by a veth pair (needs root; tools/setup installs iproute2).

use std::process::{Command, Stdio};

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// A namespace and a veth pair, removed on drop: this side has
/// `10.211.S.1`, the namespace `10.211.S.2` (S from the tag).
pub struct Link {
    pub ns: String,
    host_if: String,
    ns_if: String,
    sub: u32,
}

impl Link {
    /// Makes namespace `swt<tag>`; `qdisc` (a `tc` root qdisc, such as
    /// `tbf rate 2gbit burst 256kb latency 20ms`) shapes what this side
    /// sends into it.
    pub fn new(tag: u32, qdisc: Option<&str>) -> Link {
        let ns = format!("swt{tag}");
        let (a, b) = (format!("swa{tag}"), format!("swb{tag}"));
        let sub = 100 + tag % 100;
        let l = Link { ns: ns.clone(), host_if: a.clone(), ns_if: b.clone(), sub };
        assert!(ip(&["netns", "add", &ns]), "ip netns add (the test needs root)");
        assert!(ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]));
        assert!(ip(&["link", "set", &b, "netns", &ns]));
        assert!(ip(&["addr", "add", &format!("10.211.{sub}.1/24"), "dev", &a]));
        assert!(ip(&["link", "set", &a, "up"]));
        assert!(ip(&["-n", &ns, "addr", "add", &format!("10.211.{sub}.2/24"), "dev", &b]));
        assert!(ip(&["-n", &ns, "link", "set", &b, "up"]));
        assert!(ip(&["-n", &ns, "link", "set", "lo", "up"]));
        if let Some(qdisc) = qdisc {
            let mut tc = vec!["qdisc", "add", "dev", &a, "root"];
            tc.extend(qdisc.split(' '));
            assert!(Command::new("tc").args(&tc).status().unwrap().success(), "tc {tc:?}");
        }
        l
    }

    /// `tc [-n ns] <head> dev <end> <tail>` for this side's end and the
    /// namespace's.
    fn tc_both(&self, head: &[&str], tail: &[&str]) -> [Command; 2] {
        [(None, &self.host_if), (Some(&self.ns), &self.ns_if)].map(|(ns, dev)| {
            let mut tc = Command::new("tc");
            if let Some(ns) = ns {
                tc.args(["-n", ns]);
            }
            tc.args(head).args(["dev", dev.as_str()]).args(tail);
            tc
        })
    }

    /// Puts `qdisc` (such as `netem loss 2%`) at the root of both ends,
    /// in place of what was there: it acts on what each side sends.
    pub fn shape_both(&self, qdisc: &str) {
        let tail: Vec<&str> = std::iter::once("root").chain(qdisc.split(' ')).collect();
        for mut tc in self.tc_both(&["qdisc", "replace"], &tail) {
            assert!(tc.status().unwrap().success(), "{tc:?}");
        }
    }

    /// Takes the qdiscs of [`Link::shape_both`] away from both ends.
    pub fn unshape(&self) {
        for mut tc in self.tc_both(&["qdisc", "del"], &["root"]) {
            assert!(tc.status().unwrap().success(), "{tc:?}");
        }
    }

    /// Packets sent and dropped by the root qdiscs of both ends since they
    /// were put there (`tc -s qdisc`), summed.
    pub fn qdisc_counts(&self) -> (u64, u64) {
        let (mut sent, mut dropped) = (0, 0);
        for mut tc in self.tc_both(&["-s", "qdisc", "show"], &[]) {
            let out = tc.output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            // " Sent 1234 bytes 56 pkt (dropped 7, overlimits 0 requeues 0)"
            let words: Vec<&str> = text.split_whitespace().collect();
            for w in words.windows(2) {
                match (w[0].trim_start_matches('('), w[1].trim_end_matches(',').parse::<u64>()) {
                    ("dropped", Ok(n)) => dropped += n,
                    (_, _) if w[1] == "pkt" => sent += w[0].parse::<u64>().unwrap_or(0),
                    _ => {}
                }
            }
        }
        (sent, dropped)
    }

    /// Whether this kernel has netem (a probe on this side's end, removed
    /// again).
    pub fn has_netem(&self) -> bool {
        let add = Command::new("tc")
            .args(["qdisc", "add", "dev", &self.host_if, "root", "netem", "delay", "1ms"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if add {
            let _ = Command::new("tc").args(["qdisc", "del", "dev", &self.host_if, "root"]).status();
        }
        add
    }

    /// Cuts the namespace off, as a host that loses power or its network
    /// is: the veth pair is deleted, so its processes live on and send
    /// nothing (no FIN, no reset), and what this side sends goes nowhere.
    /// A blackhole route for the namespace's subnet is put in first, so
    /// nothing this side sends there afterwards can take the default route
    /// off this machine: it is dropped here, silently, as a vanished host
    /// would drop it.
    pub fn cut(&self) {
        let subnet = format!("10.211.{}.0/24", self.sub);
        assert!(ip(&["route", "add", "blackhole", &subnet, "metric", "1024"]), "ip route add blackhole {subnet}");
        assert!(ip(&["link", "del", &self.host_if]), "ip link del {}", self.host_if);
    }

    /// The namespace's address.
    pub fn peer(&self) -> String {
        format!("10.211.{}.2", self.sub)
    }

    /// `ip netns exec <ns>` followed by `program`.
    pub fn exec(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]);
        cmd
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        ip(&["link", "del", &self.host_if]);
        ip(&["netns", "del", &self.ns]);
        ip(&["route", "del", "blackhole", &format!("10.211.{}.0/24", self.sub)]);
    }
}
