//! A fault-injecting TCP proxy: it listens on a loopback port, forwards
//! each connection it accepts to one upstream address, both directions,
//! and on the way delays, throttles, stalls, half-closes, resets,
//! truncates or corrupts what it carries, as a test tells it.
//!
//! Where it runs, and why: a [`Proxy`] is one thread of the process that
//! made it (a test, or `tools/soak`, which can include this file with
//! `#[path]`), driven through its handle. Faults change at run time, and
//! the test reads counts back, so the proxy shares memory with its driver;
//! a separate binary would need a control protocol of its own and would be
//! built for every user of the crate. The peers on either side are real
//! processes (or engines) with real sockets: only the wire between them is
//! the proxy's.
//!
//! The model:
//! - Connections are numbered from 0 in the order they are accepted; each
//!   has two directions, [`Dir::Up`] (client to upstream) and [`Dir::Down`]
//!   (upstream to client), whose bytes are counted from 0.
//! - A [`Rule`] puts one [`Fault`] on one direction of some connections.
//!   Faults at an offset (`at`) fire when that many bytes of the direction
//!   have gone through, once per connection; delay and bandwidth hold for
//!   as long as the rule does.
//! - Rules come as an explicit list ([`Proxy::set`]) or are drawn from a
//!   seed ([`random_rules`]), so a failing run can be replayed: a proxy
//!   dropped during a panic (a failing test) prints its seed and rules.
//! - [`Proxy::heal`] removes every rule and ends every stall.
//!
//! Limits: at most [`CONNECTIONS_MAX`] connections at once (more are closed
//! at accept), [`QUEUE_BYTES_MAX`] bytes held per direction (the proxy
//! stops reading when full, so a slow side pushes back on the other), a
//! bounded connect to the upstream. Dropping the proxy stops its thread
//! and closes every socket it made.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most connections open at once; more are closed as they are accepted.
pub const CONNECTIONS_MAX: usize = 64;
/// Most bytes waiting in one direction of one connection.
pub const QUEUE_BYTES_MAX: usize = 4 << 20;
/// Most bytes read in one go (a chunk, for delays).
pub const CHUNK_BYTES_MAX: usize = 64 << 10;
/// How long connecting to the upstream may take (the proxy's one thread
/// waits for it; the upstream is on this host).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most rules at once.
pub const RULES_MAX: usize = 256;
/// The longest the thread sleeps with nothing to do: it looks at its stop
/// flag at least this often even if a wake-up were lost.
const TICK: Duration = Duration::from_millis(100);

/// A direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the client to the upstream.
    Up,
    /// From the upstream to the client.
    Down,
}

/// What goes wrong in one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Each chunk is held this long before it goes on (added latency).
    Delay(Duration),
    /// At most this many bytes per second.
    Bandwidth { bytes_per_s: u64 },
    /// Once `at` bytes went through, nothing more is read or written in
    /// this direction (the sockets stay open) for `for_ms`, or, if `None`,
    /// until [`Proxy::heal`].
    Stall { at: u64, for_ms: Option<u64> },
    /// Once `at` bytes went through, the receiving side sees the end of
    /// the stream (shutdown of the proxy's write side toward it); the other
    /// direction carries on.
    HalfClose { at: u64 },
    /// Once `at` bytes went through, both sides get a reset (RST, through
    /// SO_LINGER 0).
    Reset { at: u64 },
    /// Once `at` bytes went through, both sockets close (FIN).
    Truncate { at: u64 },
    /// The byte at offset `at` of the direction is flipped (xor 0xff).
    Corrupt { at: u64 },
}

impl Fault {
    /// The offset at which the fault acts, for the faults that have one.
    pub fn at(&self) -> Option<u64> {
        match *self {
            Fault::Delay(_) | Fault::Bandwidth { .. } => None,
            Fault::Stall { at, .. }
            | Fault::HalfClose { at }
            | Fault::Reset { at }
            | Fault::Truncate { at }
            | Fault::Corrupt { at } => Some(at),
        }
    }
}

/// Which connections a rule applies to, by accept order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conns {
    All,
    /// The `n`th connection only.
    Index(u64),
    /// The `n`th and every later one.
    From(u64),
}

impl Conns {
    fn covers(self, index: u64) -> bool {
        match self {
            Conns::All => true,
            Conns::Index(n) => index == n,
            Conns::From(n) => index >= n,
        }
    }
}

/// One fault on one direction of some connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub conns: Conns,
    pub dir: Dir,
    pub fault: Fault,
}

impl Rule {
    pub fn new(conns: Conns, dir: Dir, fault: Fault) -> Self {
        Self { conns, dir, fault }
    }
}

/// A tiny deterministic generator (xorshift64): a seed replays a
/// schedule, and test parameters. Its state must not be 0.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(hi > lo, "an empty range {lo}..{hi}");
        lo + self.next() % (hi - lo)
    }
}

/// One random fault for each of connections `0..conns`, offsets below
/// `offset_max`, drawn from `seed`: the same seed gives the same rules.
/// Stalls last 50 to 500 ms (so a random schedule never needs a heal),
/// delays 1 to 20 ms, bandwidth 1 to 64 MB/s.
pub fn random_rules(seed: u64, conns: u64, offset_max: u64) -> Vec<Rule> {
    assert!(offset_max > 0 && conns as usize <= RULES_MAX);
    // xorshift is stuck at 0.
    let mut rng = Rng(seed.max(1));
    (0..conns)
        .map(|i| {
            let dir = if rng.next() % 2 == 0 { Dir::Up } else { Dir::Down };
            let at = rng.range(0, offset_max);
            let fault = match rng.range(0, 7) {
                0 => Fault::Delay(Duration::from_millis(rng.range(1, 21))),
                1 => Fault::Bandwidth { bytes_per_s: rng.range(1, 65) << 20 },
                2 => Fault::Stall { at, for_ms: Some(rng.range(50, 501)) },
                3 => Fault::HalfClose { at },
                4 => Fault::Reset { at },
                5 => Fault::Truncate { at },
                _ => Fault::Corrupt { at },
            };
            Rule::new(Conns::Index(i), dir, fault)
        })
        .collect()
}

/// What the proxy has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Connections accepted and forwarded (refused ones not counted).
    pub accepted: u64,
    /// Connections open now.
    pub open: u64,
    /// Bytes written toward the upstream, and toward clients.
    pub up_bytes: u64,
    pub down_bytes: u64,
    /// Offset faults that fired (each once per connection).
    pub fired: u64,
}

/// What the handle and the thread share.
struct Shared {
    stop: AtomicBool,
    /// The rules, and a generation bumped on every change (and on heal).
    control: Mutex<Control>,
    accepted: AtomicU64,
    open: AtomicU64,
    up_bytes: AtomicU64,
    down_bytes: AtomicU64,
    fired: AtomicU64,
    /// Wakes the thread's poll (an eventfd).
    wake: std::os::fd::OwnedFd,
}

struct Control {
    rules: Vec<Rule>,
    generation: u64,
    /// The generation of the last heal (stalls end at a heal).
    healed: u64,
}

impl Shared {
    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to our own eventfd; a full counter only
        // means a wake-up is already pending.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// A running proxy. Dropping it stops its thread and closes every
/// connection.
pub struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    seed: Option<u64>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy on a free loopback port, forwarding to `upstream`, with no
    /// faults yet.
    pub fn start(upstream: SocketAddr) -> Self {
        Self::start_with(upstream, Vec::new(), None)
    }

    /// A proxy with `rules` from the start; `seed`, if they were drawn from
    /// one, is printed should the test fail.
    pub fn start_with(upstream: SocketAddr, rules: Vec<Rule>, seed: Option<u64>) -> Self {
        assert!(rules.len() <= RULES_MAX, "{} rules, at most {RULES_MAX}", rules.len());
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port for the proxy");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a new descriptor that nothing else owns.
        let wake = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            control: Mutex::new(Control { rules, generation: 1, healed: 0 }),
            accepted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            up_bytes: AtomicU64::new(0),
            down_bytes: AtomicU64::new(0),
            fired: AtomicU64::new(0),
            wake,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("proxy-{}", addr.port()))
            .spawn(move || Engine::new(listener, upstream, s).run())
            .expect("the proxy's thread");
        Self { addr, upstream, seed, shared, thread: Some(thread) }
    }

    /// A proxy with one random fault per connection (see [`random_rules`]).
    pub fn random(upstream: SocketAddr, seed: u64, conns: u64, offset_max: u64) -> Self {
        Self::start_with(upstream, random_rules(seed, conns, offset_max), Some(seed))
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// Replaces the rules; open connections follow the new ones from their
    /// next chunk (a fault that already fired on one does not fire again).
    pub fn set(&self, rules: Vec<Rule>) {
        assert!(rules.len() <= RULES_MAX, "{} rules, at most {RULES_MAX}", rules.len());
        let mut c = self.shared.control.lock().unwrap();
        c.rules = rules;
        c.generation += 1;
        drop(c);
        self.shared.wake();
    }

    /// Adds one rule.
    pub fn add(&self, rule: Rule) {
        let mut rules = self.rules();
        rules.push(rule);
        self.set(rules);
    }

    pub fn rules(&self) -> Vec<Rule> {
        self.shared.control.lock().unwrap().rules.clone()
    }

    /// Removes every rule and ends every stall: what is held goes on.
    /// Connections already closed, reset or half-closed stay so.
    pub fn heal(&self) {
        let mut c = self.shared.control.lock().unwrap();
        c.rules.clear();
        c.generation += 1;
        c.healed = c.generation;
        drop(c);
        self.shared.wake();
    }

    pub fn counts(&self) -> Counts {
        let s = &self.shared;
        Counts {
            accepted: s.accepted.load(Ordering::Acquire),
            open: s.open.load(Ordering::Acquire),
            up_bytes: s.up_bytes.load(Ordering::Acquire),
            down_bytes: s.down_bytes.load(Ordering::Acquire),
            fired: s.fired.load(Ordering::Acquire),
        }
    }

    /// Waits (at most `limit`) until `ready` holds of the counts.
    pub fn wait_for(&self, what: &str, limit: Duration, ready: impl Fn(&Counts) -> bool) -> Counts {
        super::poll_until(&format!("proxy {}: {what}", self.addr), limit, || {
            let c = self.counts();
            if ready(&c) { Ok(c) } else { Err(c) }
        })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "proxy {} -> {}: seed {:?}, rules {:?}, {:?}",
                self.addr,
                self.upstream,
                self.seed,
                self.rules(),
                self.counts()
            );
        }
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One chunk on its way.
struct Chunk {
    /// When it may go (now, or later under a delay).
    due: Instant,
    bytes: Vec<u8>,
    /// How much of it went already.
    sent: usize,
}

/// One direction of one connection.
struct Flow {
    dir: Dir,
    /// Bytes read from the source, and written to the destination.
    read: u64,
    written: u64,
    queue: VecDeque<Chunk>,
    queued_bytes: usize,
    /// The source said end of stream.
    eof: bool,
    /// The destination's write side is shut (end of stream passed on, or a
    /// half-close): this direction is over.
    done: bool,
    /// Until when it is stalled (`Some(None)`: until a heal).
    stall: Option<Option<Instant>>,
    /// Offset rules that fired here (only rules still set are kept).
    fired: Vec<Rule>,
    /// Bandwidth: the cap now (bytes/s), and the bytes that may still go
    /// in the current slot.
    rate: Option<u64>,
    budget: u64,
    slot_start: Instant,
}

impl Flow {
    fn new(dir: Dir, now: Instant) -> Self {
        Self {
            dir,
            read: 0,
            written: 0,
            queue: VecDeque::new(),
            queued_bytes: 0,
            eof: false,
            done: false,
            stall: None,
            fired: Vec::new(),
            rate: None,
            budget: 0,
            slot_start: now,
        }
    }

    fn stalled(&self, now: Instant) -> bool {
        matches!(self.stall, Some(None)) || matches!(self.stall, Some(Some(end)) if now < end)
    }

    /// Whether to read the source: after a half-close too (what comes is
    /// dropped), so that its end or reset is seen.
    fn wants_read(&self, now: Instant) -> bool {
        !self.eof && self.queued_bytes < QUEUE_BYTES_MAX && !self.stalled(now)
    }

    /// When it can write next: `None` if it has nothing it may send.
    fn ready_at(&self, now: Instant) -> Option<Instant> {
        if self.done || self.stalled(now) {
            return None;
        }
        let head = self.queue.front()?;
        let slot_end = self.slot_start + SLOT;
        if self.rate.is_some() && self.budget == 0 && now < slot_end {
            return Some(head.due.max(slot_end));
        }
        Some(head.due)
    }
}

/// Bandwidth is metered in slots of this length.
const SLOT: Duration = Duration::from_millis(10);

/// One proxied connection: the client's socket and the upstream's.
struct Conn {
    index: u64,
    client: TcpStream,
    upstream: TcpStream,
    /// [up, down].
    flows: [Flow; 2],
}

impl Conn {
    /// The source and destination sockets of flow `f`.
    fn ends(&mut self, f: usize) -> (&mut TcpStream, &mut TcpStream, &mut Flow) {
        let Conn { client, upstream, flows, .. } = self;
        match f {
            0 => (client, upstream, &mut flows[0]),
            _ => (upstream, client, &mut flows[1]),
        }
    }
}

/// How a connection ends, when it does.
enum End {
    /// Both directions passed their end of stream on: close quietly.
    Finished,
    /// Close both sockets with a FIN.
    Close,
    /// Reset both (SO_LINGER 0, then close).
    Reset,
}

/// The proxy's thread.
struct Engine {
    listener: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    conns: Vec<Conn>,
    rules: Vec<Rule>,
    generation: u64,
    healed: u64,
    next_index: u64,
    buf: Vec<u8>,
}

impl Engine {
    fn new(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) -> Self {
        Self {
            listener,
            upstream,
            shared,
            conns: Vec::new(),
            rules: Vec::new(),
            generation: 0,
            healed: 0,
            next_index: 0,
            buf: vec![0; CHUNK_BYTES_MAX],
        }
    }

    fn run(mut self) {
        while !self.shared.stop.load(Ordering::Acquire) {
            self.refresh();
            let now = Instant::now();
            let mut fds = vec![
                libc::pollfd { fd: self.shared.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            let mut wait = TICK;
            for c in &mut self.conns {
                for f in 0..2 {
                    let (src, dst, flow) = c.ends(f);
                    if flow.wants_read(now) {
                        fds.push(libc::pollfd { fd: src.as_raw_fd(), events: libc::POLLIN, revents: 0 });
                    }
                    if let Some(until) = flow.ready_at(now) {
                        if until <= now {
                            fds.push(libc::pollfd { fd: dst.as_raw_fd(), events: libc::POLLOUT, revents: 0 });
                        } else {
                            wait = wait.min(until - now);
                        }
                    }
                    if let Some(Some(end)) = flow.stall {
                        wait = wait.min(end.saturating_duration_since(now));
                    }
                }
            }
            let ms = wait.as_millis().clamp(if wait.is_zero() { 0 } else { 1 }, TICK.as_millis()) as i32;
            // SAFETY: fds is a live, correctly sized array of pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            if n < 0 && std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                panic!("proxy poll: {}", std::io::Error::last_os_error());
            }
            if fds[0].revents != 0 {
                let mut sink = [0u8; 8];
                // SAFETY: an 8-byte read from our own eventfd into a local.
                let _ = unsafe { libc::read(self.shared.wake.as_raw_fd(), sink.as_mut_ptr().cast(), 8) };
            }
            // Rules set before a client connected apply to it.
            self.refresh();
            if fds[1].revents != 0 {
                self.accept();
            }
            // Every connection is serviced each round: reads and writes are
            // non-blocking, so one that is not ready costs one failed call.
            let mut i = 0;
            while i < self.conns.len() {
                match self.service(i) {
                    None => i += 1,
                    Some(end) => {
                        let c = self.conns.swap_remove(i);
                        close(c, end);
                        self.shared.open.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            }
        }
        for c in std::mem::take(&mut self.conns) {
            close(c, End::Close);
        }
        self.shared.open.store(0, Ordering::Release);
    }

    /// Takes new rules, and a heal, from the handle.
    fn refresh(&mut self) {
        let c = self.shared.control.lock().unwrap();
        if c.generation == self.generation {
            return;
        }
        self.rules = c.rules.clone();
        self.generation = c.generation;
        let healed = c.healed;
        drop(c);
        let heal = healed != self.healed;
        self.healed = healed;
        for conn in &mut self.conns {
            for flow in &mut conn.flows {
                if heal {
                    flow.stall = None;
                }
                // Bounded by the rules: marks of rules no longer set go.
                flow.fired.retain(|r| self.rules.contains(r));
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let client = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // Out of descriptors and the like: try on the next round.
                Err(_) => return,
            };
            if self.conns.len() >= CONNECTIONS_MAX {
                continue;
            }
            let Ok(upstream) = TcpStream::connect_timeout(&self.upstream, CONNECT_TIMEOUT) else {
                // The upstream is not there: the client sees a reset, as it
                // would connecting straight to it.
                reset(&client);
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            if client.set_nonblocking(true).is_err() || upstream.set_nonblocking(true).is_err() {
                continue;
            }
            let now = Instant::now();
            let index = self.next_index;
            self.next_index += 1;
            self.conns.push(Conn {
                index,
                client,
                upstream,
                flows: [Flow::new(Dir::Up, now), Flow::new(Dir::Down, now)],
            });
            self.shared.accepted.fetch_add(1, Ordering::AcqRel);
            self.shared.open.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Moves what it can on connection `i`; says how it ends, if it does.
    fn service(&mut self, i: usize) -> Option<End> {
        let now = Instant::now();
        let (rules, shared) = (&self.rules, &self.shared);
        let conn = &mut self.conns[i];
        let index = conn.index;
        for f in 0..2 {
            let (src, dst, flow) = conn.ends(f);
            let dir = flow.dir;
            let mine = move |r: &&Rule| r.dir == dir && r.conns.covers(index);
            flow.rate = rules.iter().filter(mine).find_map(|r| match r.fault {
                Fault::Bandwidth { bytes_per_s } => Some(bytes_per_s.max(1)),
                _ => None,
            });
            // Read.
            if flow.wants_read(now) {
                let room = (QUEUE_BYTES_MAX - flow.queued_bytes).min(CHUNK_BYTES_MAX);
                match src.read(&mut self.buf[..room]) {
                    Ok(0) => flow.eof = true,
                    // Half-closed: what comes is dropped.
                    Ok(_) if flow.done => {}
                    Ok(n) => {
                        let mut bytes = self.buf[..n].to_vec();
                        for r in rules.iter().filter(mine) {
                            if let Fault::Corrupt { at } = r.fault
                                && (flow.read..flow.read + n as u64).contains(&at)
                            {
                                bytes[(at - flow.read) as usize] ^= 0xff;
                                shared.fired.fetch_add(1, Ordering::AcqRel);
                            }
                        }
                        let delay = rules
                            .iter()
                            .filter(mine)
                            .filter_map(|r| match r.fault {
                                Fault::Delay(d) => Some(d),
                                _ => None,
                            })
                            .max()
                            .unwrap_or_default();
                        flow.read += n as u64;
                        flow.queued_bytes += n;
                        flow.queue.push_back(Chunk { due: now + delay, bytes, sent: 0 });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                    // The source broke (reset): so does the other side.
                    Err(_) => return Some(End::Reset),
                }
            }
            // Offset faults due now, in list order.
            for r in rules.iter().filter(mine) {
                if flow.fired.contains(r) {
                    continue;
                }
                let end = match r.fault {
                    Fault::Stall { at, for_ms } if flow.written >= at => {
                        flow.stall = Some(for_ms.map(|ms| now + Duration::from_millis(ms)));
                        None
                    }
                    Fault::HalfClose { at } if flow.written >= at => {
                        let _ = dst.shutdown(Shutdown::Write);
                        flow.done = true;
                        None
                    }
                    Fault::Reset { at } if flow.written >= at => Some(End::Reset),
                    Fault::Truncate { at } if flow.written >= at => Some(End::Close),
                    _ => continue,
                };
                flow.fired.push(*r);
                shared.fired.fetch_add(1, Ordering::AcqRel);
                if end.is_some() {
                    return end;
                }
            }
            // Write.
            while !flow.done && !flow.stalled(now) {
                let Some(head) = flow.queue.front_mut() else { break };
                if head.due > now {
                    break;
                }
                let mut len = head.bytes.len() - head.sent;
                // Stop at the next offset fault, so it acts at its byte.
                for r in rules.iter().filter(mine) {
                    if !flow.fired.contains(r)
                        && !matches!(r.fault, Fault::Corrupt { .. })
                        && let Some(at) = r.fault.at()
                        && at > flow.written
                    {
                        len = len.min((at - flow.written) as usize);
                    }
                }
                if let Some(rate) = flow.rate {
                    if now.duration_since(flow.slot_start) >= SLOT {
                        flow.slot_start = now;
                        // A slot's share of the rate (SLOT is 1/100 s).
                        flow.budget = (rate / 100).max(1);
                    }
                    len = len.min(flow.budget as usize);
                }
                if len == 0 {
                    break;
                }
                match dst.write(&head.bytes[head.sent..head.sent + len]) {
                    Ok(n) => {
                        head.sent += n;
                        flow.written += n as u64;
                        flow.queued_bytes -= n;
                        flow.budget = flow.budget.saturating_sub(n as u64);
                        let counter = if flow.dir == Dir::Up { &shared.up_bytes } else { &shared.down_bytes };
                        counter.fetch_add(n as u64, Ordering::AcqRel);
                        if head.sent == head.bytes.len() {
                            flow.queue.pop_front();
                        }
                        if n < len {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => break,
                    Err(_) => return Some(End::Reset),
                }
                // An offset fault may be due now: the next round acts.
                if rules.iter().filter(mine).any(|r| r.fault.at() == Some(flow.written)) {
                    break;
                }
            }
            // Pass the end of stream on once everything before it went.
            if flow.eof && flow.queue.is_empty() && !flow.done {
                let _ = dst.shutdown(Shutdown::Write);
                flow.done = true;
            }
        }
        conn.flows.iter().all(|f| f.done && f.eof).then_some(End::Finished)
    }
}

/// Sets SO_LINGER to 0, so that closing the socket sends a reset.
fn reset(s: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on our own socket with a correctly sized value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn close(c: Conn, end: End) {
    if matches!(end, End::Reset) {
        reset(&c.client);
        reset(&c.upstream);
    }
    // Dropping the streams closes the sockets (the only descriptors).
    drop(c);
}
