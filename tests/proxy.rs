//! The fault-injecting proxy of `tests/interop/proxy.rs`, against plain
//! sockets: each fault does what it says, at the byte it says, and the
//! proxy leaves no thread or descriptor behind.

mod interop;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use interop::proxy::{Conns, Dir, Fault, Proxy, Rule, random_rules};

/// The tests count this process's descriptors: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bound of every blocking read and write in these tests.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// An upstream that runs `serve` on each of the first `n` connections it
/// accepts, each on its own thread; `join` returns what each returned.
struct Upstream<T> {
    addr: SocketAddr,
    done: mpsc::Receiver<T>,
    acceptor: JoinHandle<()>,
}

impl<T: Send + 'static> Upstream<T> {
    fn start(n: usize, serve: impl Fn(TcpStream) -> T + Send + Sync + Clone + 'static) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, done) = mpsc::channel();
        let acceptor = std::thread::spawn(move || {
            for _ in 0..n {
                let Ok((s, _)) = l.accept() else { return };
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                let (serve, tx) = (serve.clone(), tx.clone());
                std::thread::spawn(move || {
                    let _ = tx.send(serve(s));
                });
            }
        });
        Self { addr, done, acceptor }
    }

    /// What the next connection's `serve` returned.
    fn next(&self) -> T {
        self.done.recv_timeout(IO_TIMEOUT * 2).expect("the upstream finished a connection")
    }
}

/// Echoes until the end of stream; returns the bytes echoed.
fn echo(mut s: TcpStream) -> u64 {
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return total,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return total;
                }
                total += n as u64;
            }
        }
    }
}

/// Reads until the end of stream or an error; returns what came and how it
/// ended.
fn drain(mut s: TcpStream) -> (Vec<u8>, Option<ErrorKind>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e.kind())),
        }
    }
}

fn connect(p: &Proxy) -> TcpStream {
    let s = TcpStream::connect(p.addr()).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Whether a thread of this process has this name.
fn thread_named(name: &str) -> bool {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(Result::ok)
        .any(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|comm| comm.trim() == name))
}

/// Writes `bytes` on a thread of its own (so a stalled peer does not block
/// the test), then half-closes.
fn send_then_close(s: &TcpStream, bytes: Vec<u8>) -> JoinHandle<std::io::Result<()>> {
    let mut w = s.try_clone().unwrap();
    std::thread::spawn(move || {
        w.write_all(&bytes)?;
        w.shutdown(std::net::Shutdown::Write)
    })
}

#[test]
fn forwards_both_ways_counts_and_closes() {
    let _g = serial();
    let up = Upstream::start(2, echo);
    let p = Proxy::start(up.addr);
    for round in 0..2u8 {
        let s = connect(&p);
        let sent = data(1 << 20, round);
        let w = send_then_close(&s, sent.clone());
        let (got, end) = drain(s);
        w.join().unwrap().unwrap();
        assert_eq!(end, None);
        assert!(got == sent, "round {round}: {} bytes back", got.len());
        assert_eq!(up.next(), 1 << 20);
    }
    let c = p.wait_for("both connections closed", IO_TIMEOUT, |c| c.open == 0);
    assert_eq!((c.accepted, c.up_bytes, c.down_bytes, c.fired), (2, 2 << 20, 2 << 20, 0));
}

#[test]
fn delay_holds_each_chunk_and_bandwidth_caps_the_rate() {
    let _g = serial();
    let up = Upstream::start(2, echo);
    let delay = Duration::from_millis(150);
    let p = Proxy::start_with(up.addr, vec![Rule::new(Conns::Index(0), Dir::Down, Fault::Delay(delay))], None);
    let mut s = connect(&p);
    let start = Instant::now();
    s.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).unwrap();
    // A lower bound only: the proxy cannot hand the byte on earlier.
    assert!(start.elapsed() >= delay, "came back after {:?}", start.elapsed());
    assert_eq!(&back, b"ping");
    drop(s);

    // 1 MiB at 4 MiB/s: a quarter of a second at the least.
    p.set(vec![Rule::new(Conns::Index(1), Dir::Up, Fault::Bandwidth { bytes_per_s: 4 << 20 })]);
    // Timed from before the connect: the proxy's clock for the connection
    // may start as soon as it accepts, before this thread runs on.
    let start = Instant::now();
    let s = connect(&p);
    let sent = data(1 << 20, 9);
    let w = send_then_close(&s, sent.clone());
    let (got, _) = drain(s);
    w.join().unwrap().unwrap();
    assert!(got == sent);
    assert!(start.elapsed() >= Duration::from_millis(200), "1 MiB in {:?}", start.elapsed());
}

#[test]
fn a_stall_holds_at_its_byte_until_healed_or_its_time_is_up() {
    let _g = serial();
    let up = Upstream::start(2, drain);
    let p = Proxy::start_with(
        up.addr,
        vec![Rule::new(Conns::Index(0), Dir::Up, Fault::Stall { at: 10, for_ms: None })],
        None,
    );
    let s = connect(&p);
    let w = send_then_close(&s, data(100, 1));
    p.wait_for("the stall", IO_TIMEOUT, |c| c.fired == 1);
    w.join().unwrap().unwrap();
    // Held: ten bytes went, the socket is open, nothing else moves.
    std::thread::sleep(Duration::from_millis(100));
    let c = p.counts();
    assert_eq!((c.up_bytes, c.open), (10, 1), "{c:?}");
    assert!(up.done.try_recv().is_err(), "the upstream saw no end of stream");
    p.heal();
    let (got, end) = up.next();
    assert_eq!((got, end), (data(100, 1), None), "everything, in order, after the heal");
    drop(s);

    // A stall of 200 ms ends by itself.
    p.set(vec![Rule::new(Conns::Index(1), Dir::Up, Fault::Stall { at: 0, for_ms: Some(200) })]);
    // Timed from before the connect: a stall at byte 0 starts when the
    // proxy first looks at the connection, which may be before this
    // thread runs on after its connect returns.
    let start = Instant::now();
    let s = connect(&p);
    let w = send_then_close(&s, data(1000, 2));
    let (got, _) = up.next();
    w.join().unwrap().unwrap();
    assert!(got == data(1000, 2));
    assert!(start.elapsed() >= Duration::from_millis(200));
}

#[test]
fn half_close_ends_one_direction_only() {
    let _g = serial();
    // The upstream says hello, then reads to the end.
    let up = Upstream::start(1, |mut s: TcpStream| {
        s.write_all(b"hello world").unwrap();
        drain(s)
    });
    let p = Proxy::start_with(up.addr, vec![Rule::new(Conns::All, Dir::Down, Fault::HalfClose { at: 5 })], None);
    let mut s = connect(&p);
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hello", "five bytes, then the end of stream");
    // The other way still works.
    s.write_all(b"still here").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(up.next(), (b"still here".to_vec(), None));
    p.wait_for("the connection to close", IO_TIMEOUT, |c| c.open == 0);
}

#[test]
fn reset_and_truncate_act_at_their_byte() {
    let _g = serial();
    // The upstream sends 100,000 bytes, then reads to the end; it returns
    // the first error it met, writing or reading.
    let up = Upstream::start(2, |mut s: TcpStream| {
        let wrote = s.write_all(&data(100_000, 3)).err().map(|e| e.kind());
        wrote.or(drain(s).1)
    });
    let p = Proxy::start_with(up.addr, vec![Rule::new(Conns::Index(0), Dir::Down, Fault::Reset { at: 1000 })], None);
    let (got, end) = drain(connect(&p));
    assert!(got.len() <= 1000 && got[..] == data(100_000, 3)[..got.len()], "{} bytes before the reset", got.len());
    assert_eq!(end, Some(ErrorKind::ConnectionReset));
    let upstream_end = up.next();
    assert!(
        matches!(upstream_end, Some(ErrorKind::ConnectionReset | ErrorKind::BrokenPipe)),
        "the upstream is reset too: {upstream_end:?}"
    );

    p.set(vec![Rule::new(Conns::Index(1), Dir::Down, Fault::Truncate { at: 4321 })]);
    let (got, end) = drain(connect(&p));
    assert_eq!((got.len(), end), (4321, None), "exactly the bytes before the cut, then a clean end");
    assert!(got[..] == data(100_000, 3)[..4321]);
    p.wait_for("both closed", IO_TIMEOUT, |c| c.open == 0 && c.fired == 2);
}

#[test]
fn corrupt_flips_exactly_one_byte() {
    let _g = serial();
    let up = Upstream::start(1, drain);
    let p = Proxy::start_with(up.addr, vec![Rule::new(Conns::All, Dir::Up, Fault::Corrupt { at: 70_000 })], None);
    let s = connect(&p);
    let sent = data(200_000, 4);
    send_then_close(&s, sent.clone()).join().unwrap().unwrap();
    let (got, _) = up.next();
    assert_eq!(got.len(), sent.len());
    let diff: Vec<usize> = (0..sent.len()).filter(|&i| got[i] != sent[i]).collect();
    assert_eq!(diff, [70_000]);
    assert_eq!(got[70_000], !sent[70_000]);
}

#[test]
fn a_missing_upstream_resets_the_client() {
    let _g = serial();
    let gone = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let p = Proxy::start(gone);
    let (got, end) = drain(connect(&p));
    assert!(got.is_empty());
    assert_eq!(end, Some(ErrorKind::ConnectionReset));
    assert_eq!(p.counts().accepted, 0);
}

#[test]
fn random_schedules_replay_from_their_seed_and_every_connection_ends() {
    let _g = serial();
    assert_eq!(random_rules(42, 16, 10_000), random_rules(42, 16, 10_000));
    assert_ne!(random_rules(42, 16, 10_000), random_rules(43, 16, 10_000));
    let seed = std::env::var("PROXY_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_u64);
    let fds = open_fds();
    let conns = 8;
    let up = Upstream::start(conns, echo);
    let p = Proxy::random(up.addr, seed, conns as u64, 50_000);
    let thread = format!("proxy-{}", p.addr().port());
    interop::poll_true(&format!("a thread named {thread}"), IO_TIMEOUT, || thread_named(&thread));
    for i in 0..conns {
        let s = connect(&p);
        let sent = data(100_000, i as u8);
        let w = send_then_close(&s, sent.clone());
        // Whatever the fault, the connection ends within the bound: data
        // intact up to the fault's byte, then an end, a reset or all of it.
        let (got, _) = drain(s);
        let _ = w.join().unwrap();
        assert!(got.len() <= sent.len(), "seed {seed}, connection {i}: {} bytes", got.len());
        let rule = p.rules()[i];
        let corrupt = match rule.fault {
            Fault::Corrupt { at } => Some(at as usize),
            _ => None,
        };
        let wrong: Vec<usize> = (0..got.len()).filter(|&k| got[k] != sent[k]).collect();
        assert!(
            wrong.is_empty() || (wrong.len() == 1 && Some(wrong[0]) == corrupt),
            "seed {seed}, connection {i} ({rule:?}): bytes differ at {wrong:?}"
        );
        up.next();
    }
    drop(p);
    assert!(!thread_named(&thread), "the proxy's thread is joined");
    up.acceptor.join().unwrap();
    // Every socket the proxy made is closed (the upstream's threads close
    // theirs as their connections end; earlier tests' may still be closing).
    interop::poll_until(&format!("seed {seed}: the descriptors come back"), IO_TIMEOUT, || {
        let now = open_fds();
        if now <= fds { Ok(()) } else { Err(format!("{now} open, {fds} before")) }
    });
}

#[test]
fn dropping_the_proxy_closes_its_open_connections() {
    let _g = serial();
    let fds = open_fds();
    let up = Upstream::start(4, drain);
    let p =
        Proxy::start_with(up.addr, vec![Rule::new(Conns::All, Dir::Up, Fault::Stall { at: 0, for_ms: None })], None);
    let clients: Vec<TcpStream> = (0..4).map(|_| connect(&p)).collect();
    p.wait_for("four connections", IO_TIMEOUT, |c| c.open == 4);
    drop(p);
    for _ in 0..4 {
        assert_eq!(up.next(), (Vec::new(), None), "each upstream connection sees its end");
    }
    for mut c in clients {
        let mut buf = [0u8; 1];
        assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)), "each client sees its end");
    }
    up.acceptor.join().unwrap();
    interop::poll_until("the descriptors come back", IO_TIMEOUT, || {
        let now = open_fds();
        if now <= fds { Ok(()) } else { Err(format!("{now} open, {fds} before")) }
    });
}
