//! Segment and server names: `host`, `host:port`, `[v6]:port`, or a bare
//! IPv6 address. Mooncake mis-parsed IPv6 names for a long time (it once
//! bound port 340 from one); here a name either parses fully or is refused.

use std::net::Ipv6Addr;

/// A parsed `host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// The host, without brackets.
    pub host: String,
    pub port: Option<u16>,
}

impl HostPort {
    /// `host:port`, with brackets around an IPv6 host.
    pub fn with_port(host: &str, port: u16) -> String {
        if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
    }
}

/// Parses a name. Errors say what is wrong.
pub fn parse(name: &str) -> Result<HostPort, String> {
    let name = name.trim();
    if name.is_empty() {
        return Err("empty host name".into());
    }
    if let Some(rest) = name.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| format!("{name:?}: unclosed '['"))?;
        host.parse::<Ipv6Addr>().map_err(|_| format!("{name:?}: {host:?} is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(parse_port(name, p.strip_prefix(':').ok_or_else(|| format!("{name:?}: junk after ']'"))?)?),
        };
        return Ok(HostPort { host: host.to_string(), port });
    }
    if name.parse::<Ipv6Addr>().is_ok() {
        return Ok(HostPort { host: name.to_string(), port: None });
    }
    match name.rsplit_once(':') {
        Some((host, port)) => {
            if host.is_empty() || host.contains(':') {
                return Err(format!("{name:?}: bracket an IPv6 host with a port, as [::1]:12345"));
            }
            Ok(HostPort { host: host.to_string(), port: Some(parse_port(name, port)?) })
        }
        None => Ok(HostPort { host: name.to_string(), port: None }),
    }
}

fn parse_port(name: &str, port: &str) -> Result<u16, String> {
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{name:?}: port {port:?} is not a number"));
    }
    port.parse::<u16>().map_err(|_| format!("{name:?}: port {port} is above 65535"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(host: &str, port: Option<u16>) -> HostPort {
        HostPort { host: host.into(), port }
    }

    #[test]
    fn parses_the_forms_mooncake_uses() {
        assert_eq!(parse("127.0.0.1:12345"), Ok(hp("127.0.0.1", Some(12345))));
        assert_eq!(parse("127.0.0.1"), Ok(hp("127.0.0.1", None)));
        assert_eq!(parse("node-7.example"), Ok(hp("node-7.example", None)));
        assert_eq!(parse("[::1]:15000"), Ok(hp("::1", Some(15000))));
        assert_eq!(parse("[fe80::1]"), Ok(hp("fe80::1", None)));
        assert_eq!(parse("fe80::1:2"), Ok(hp("fe80::1:2", None)), "a bare IPv6 address has no port");
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in ["", "h:", "h:x", "h:70000", ":80", "[::1", "[::1]x", "[zz]:1", "a:b:c"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn formats_with_brackets_when_needed() {
        assert_eq!(HostPort::with_port("::1", 7), "[::1]:7");
        assert_eq!(HostPort::with_port("10.0.0.1", 7), "10.0.0.1:7");
    }
}
