//! Object streams end to end on loopback: a shardwire sender and receiver.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardwire::proto::objstream::ObjHdr;
use shardwire::stream::{Receiver, RxOptions, Stream, StreamOptions, Termination};

type Got = Arc<Mutex<Vec<(ObjHdr, Vec<u8>)>>>;

fn collecting(rx: &Receiver, trname: &str) -> Got {
    let got: Got = Arc::default();
    let g = got.clone();
    rx.handle(trname, move |hdr: &ObjHdr, body: &mut shardwire::stream::ObjReader<'_>| {
        let mut v = Vec::new();
        body.read_to_end(&mut v)?;
        g.lock().unwrap().push((hdr.clone(), v));
        Ok(())
    })
    .unwrap();
    got
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn one_stream_carries_objects_in_order() {
    let rx = Receiver::bind("127.0.0.1:0".parse().unwrap(), RxOptions::default()).unwrap();
    let got = collecting(&rx, "t1");
    let done: Arc<Mutex<Vec<String>>> = Arc::default();
    let d = done.clone();
    let opts = StreamOptions {
        on_sent: Some(Arc::new(move |h: &ObjHdr, r| {
            assert!(r.is_ok(), "{r:?}");
            d.lock().unwrap().push(h.name.clone());
        })),
        ..StreamOptions::default()
    };
    let s = Stream::new(&rx.url(), "t1", opts).unwrap();
    let mut want = Vec::new();
    for i in 0..200u64 {
        let len = match i % 5 {
            0 => 0,
            1 => 1,
            2 => 4096,
            3 => (i as usize * 7919) % 300_000,
            _ => 2 << 20,
        };
        let body = pattern(i, len);
        let mut h = ObjHdr::new("bck", &format!("o{i}"), len as i64);
        h.opaque = i.to_be_bytes().to_vec();
        h.attrs.custom.push(("k".into(), format!("{i}")));
        s.send(h.clone(), body.clone()).unwrap();
        want.push((h, body));
    }
    assert_eq!(s.fin(), Termination::EndOfStream);
    let names: Vec<String> = want.iter().map(|(h, _)| h.name.clone()).collect();
    assert_eq!(*done.lock().unwrap(), names, "one completion per object, in order");
    // The receiver answers once it has handled the last object.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap().len() < want.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let got = got.lock().unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.0, w.0);
        assert!(g.1 == w.1, "body of {}", w.0.name);
    }
    let stats = s.stats();
    assert_eq!(stats.num, 200);
    assert_eq!(stats.size as usize, want.iter().map(|(_, b)| b.len()).sum::<usize>());
    let ep = rx.stats();
    assert_eq!(ep["t1"].total_num, 200);
}
