//! Bodies of the stream fuzz targets in `fuzz/`, kept here so the normal
//! test suite runs them too (over generated inputs) and they cannot rot.

use std::sync::Arc;
use std::time::Duration;

use super::rx::RecvError;
use super::rx::conn::RxConn;
use super::tx::conn::{Action, TxConn, TxFraming};
use super::tx::{Outgoing, batch::Payload};
use crate::proto::linger::LingerLimits;
use crate::proto::objstream::ObjHdr;

/// The sender core fed arbitrary receiver bytes, with the other events
/// (sends completing, timers, `fin`, the receiver closing) interleaved as
/// the input says. Nothing panics; every object completes exactly once,
/// and the stream terminates at most once (exactly once after `stop`).
pub fn objstream_sender(data: &[u8]) {
    let Some((&shape, rest)) = data.split_first() else { return };
    let framing = TxFraming {
        head: b"PUT /v1/objstream/f HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
        pdu: (shape & 1 == 1).then_some(1000),
        compression: None,
        max_header: 4096,
        batch_bytes: 4096,
        batch_bytes_max: 8192,
        idle_teardown: Duration::from_secs(4),
        send_timeout: Duration::from_secs(60),
    };
    let mut core = TxConn::new(framing);
    let objects = 1 + usize::from(shape >> 4);
    for i in 0..objects {
        let len = (usize::from(shape) * 131 * (i + 1)) % 20_000;
        let hdr = ObjHdr::new("b", &i.to_string(), len as i64);
        let body = if len == 0 { Payload::Empty } else { Payload::Bytes(Arc::from(vec![i as u8; len])) };
        core.enqueue(Outgoing { hdr, body, cb: None, started: false, sent: 0, failed: None });
    }
    let mut completed = vec![0u32; objects];
    let mut terminated = 0;
    let mut sent_out: usize = 0;
    let mut drive = |core: &mut TxConn, sent_out: &mut usize, send_now: bool| {
        for _ in 0..10_000 {
            let Some(a) = core.poll() else { break };
            match a {
                Action::Connect => core.on_connected(),
                Action::Send => *sent_out = core.batch().map_or(0, |b| b.total()),
                Action::Complete => {
                    let (o, _) = core.take_completed().expect("one per Complete");
                    let i: usize = o.hdr.name.parse().expect("named by index");
                    completed[i] += 1;
                }
                Action::Terminate(_) => terminated += 1,
                _ => {}
            }
            if send_now && *sent_out > 0 && core.batch().is_some() {
                core.on_sent(std::mem::take(sent_out));
            }
        }
    };
    drive(&mut core, &mut sent_out, shape & 2 == 0);
    let mut at = 0;
    while at < rest.len() {
        let b = rest[at];
        at += 1;
        match b % 8 {
            0 if sent_out > 0 && core.batch().is_some() => core.on_sent(std::mem::take(&mut sent_out)),
            1 => core.fin(),
            2 => core.on_idle(),
            3 => core.on_watchdog(u64::from(b >> 3)),
            4 if b & 0x80 != 0 => core.on_eof(),
            _ => {
                let n = (usize::from(b >> 3) + 1).min(rest.len() - at);
                core.on_received(&rest[at..at + n]);
                at += n;
            }
        }
        drive(&mut core, &mut sent_out, shape & 2 == 0);
    }
    core.stop();
    drive(&mut core, &mut sent_out, true);
    if sent_out > 0 && core.batch().is_some() {
        core.on_sent(sent_out);
    }
    assert!(completed.iter().all(|&n| n == 1), "each object completes once: {completed:?}");
    assert_eq!(terminated, 1, "the stream terminates once");
}

/// The receiver's connection core fed arbitrary client bytes as request
/// heads, with bodies ending well or not and the client draining, as the
/// input says. Nothing panics; at most a handful of responses are ever
/// queued, each a well-formed HTTP response; a refused connection ends.
pub fn objstream_receiver(data: &[u8]) {
    let limits = LingerLimits { bytes_max: 512, time: Duration::from_secs(1) };
    let mut c = RxConn::new(limits);
    let now = std::time::Instant::now();
    let mut buf: Vec<u8> = Vec::new();
    for (i, &b) in data.iter().enumerate() {
        if c.closed().is_some() {
            break;
        }
        if c.lingering() {
            c.on_drained(usize::from(b));
            continue;
        }
        if c.reading_heads() {
            buf.push(b);
            if let Some((body, handler, used)) =
                c.on_head(&buf, |t| if t.len() % 2 == 0 { Ok(t.len()) } else { Err("no".to_string()) })
            {
                assert!(used <= buf.len() && handler % 2 == 0 && body.trname.len() == handler);
                buf.drain(..used);
            }
        } else if b % 3 == 0 {
            let result = if b & 4 == 0 { Ok(()) } else { Err(RecvError::Handler("bad".into())) };
            c.on_body_done(result, b & 8 != 0, "fuzz");
        }
        if i % 4 == 0 {
            while let Some(out) = c.poll_send().map(<[u8]>::to_vec) {
                assert!(crate::http::request::status_of(&out).is_ok_and(|s| s.is_some()), "a whole response head");
                c.on_sent(out.len(), now);
            }
        }
        let _ = c.poll_half_close();
    }
    c.on_timer(now + Duration::from_secs(2));
    assert!(c.next_deadline().is_none() || c.closed().is_some(), "a drain ends by its deadline");
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_sender_target_survives_generated_inputs() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        for round in 0..3000u32 {
            let mut input: Vec<u8> = (0..(round % 200) as usize)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if round % 3 == 0 {
                input.extend_from_slice(ok);
            }
            super::objstream_sender(&input);
            let mut heads = b"PUT /v1/objstream/tt HTTP/1.1\r\nContent-Length: 0\r\n\r\n".to_vec();
            heads.extend_from_slice(&input);
            super::objstream_receiver(&heads);
            super::objstream_receiver(&input);
        }
    }
}
