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
        let l = Link { ns: ns.clone(), host_if: a.clone(), sub };
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
    }
}
