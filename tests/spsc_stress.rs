//! The SPSC ring under a concurrent producer and consumer: order is kept and
//! nothing is lost or duplicated, over millions of messages, and a consumer
//! that closes mid-stream strands nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use shardwire::runtime::spsc::{self, PushError};

#[test]
fn millions_of_messages_in_order_none_lost_none_duplicated() {
    const N: u64 = 20_000_000;
    for capacity in [2usize, 64, 4096] {
        let (mut p, mut c) = spsc::channel::<u64>(capacity);
        let producer = thread::spawn(move || {
            for i in 0..N {
                let mut v = i;
                loop {
                    match p.push_unchecked(v) {
                        Ok(()) => break,
                        Err(e) => v = e.into_inner(),
                    }
                    std::hint::spin_loop();
                }
            }
        });
        let mut expected = 0u64;
        let mut sum = 0u64;
        while expected < N {
            match c.pop() {
                Some(v) => {
                    assert_eq!(v, expected, "capacity {capacity}: out of order or duplicated");
                    sum = sum.wrapping_add(v);
                    expected += 1;
                }
                None => std::hint::spin_loop(),
            }
        }
        producer.join().unwrap();
        assert_eq!(c.pop(), None, "capacity {capacity}: nothing extra");
        assert_eq!(sum, N * (N - 1) / 2);
    }
}

/// A value that counts its drops, so double drops and leaks show.
struct Tracked {
    seq: u64,
    drops: Arc<AtomicU64>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn heap_values_are_dropped_exactly_once() {
    const N: u64 = 1_000_000;
    let drops = Arc::new(AtomicU64::new(0));
    let (mut p, mut c) = spsc::channel::<Box<Tracked>>(256);
    let d = drops.clone();
    let producer = thread::spawn(move || {
        for seq in 0..N {
            let mut v = Box::new(Tracked { seq, drops: d.clone() });
            while let Err(e) = p.push(v) {
                v = e.into_inner();
                std::hint::spin_loop();
            }
        }
    });
    // Leave the last 100 in the ring (it holds 256, so the producer can
    // finish): dropping the ring must drop them.
    let mut next = 0;
    while next < N - 100 {
        if let Some(v) = c.pop() {
            assert_eq!(v.seq, next);
            next += 1;
        }
    }
    producer.join().unwrap();
    assert!(c.is_abandoned());
    drop(c);
    assert_eq!(drops.load(Ordering::SeqCst), N, "every value dropped once, popped or not");
}

#[test]
fn closing_under_a_racing_producer_strands_nothing() {
    // Each round: a producer pushes until refused, while the consumer pops a
    // little and then closes. Every value must end up exactly once in one of
    // three places: popped, dropped by the close, or handed back Closed.
    for round in 0..2_000u64 {
        let drops = Arc::new(AtomicU64::new(0));
        let (mut p, mut c) = spsc::channel::<Tracked>(8);
        let d = drops.clone();
        let producer = thread::spawn(move || {
            let (mut pushed, mut returned) = (0u64, 0u64);
            loop {
                match p.push(Tracked { seq: pushed, drops: d.clone() }) {
                    Ok(()) => pushed += 1,
                    Err(PushError::Full(v)) => {
                        drop(v);
                        returned += 1;
                        std::hint::spin_loop();
                    }
                    Err(PushError::Closed(v)) => {
                        drop(v);
                        returned += 1;
                        break (pushed, returned);
                    }
                }
            }
        });
        let mut popped = 0u64;
        for _ in 0..(round % 17) {
            if c.pop().is_some() {
                popped += 1;
            }
        }
        let drained = c.close_and_drain() as u64;
        let (pushed, returned) = producer.join().unwrap();
        assert!(popped + drained <= pushed, "round {round}: {popped} + {drained} > {pushed}");
        // Pushes that returned Ok after the close were taken by the drain or
        // dropped when the ring went away; either way, dropped exactly once.
        assert_eq!(drops.load(Ordering::SeqCst), pushed + returned, "round {round}: leak or double drop");
    }
}
