//! Drivers without I/O for the TCP v2 connection cores: the unit tests and
//! the fuzz targets drive the cores through these, over real memory and
//! scripted (or arbitrary) peer bytes.

/// Drives a [`ClientConn`](super::client::ClientConn) as if it were
/// connected to a server that answers with scripted bytes.
pub mod client {
    use std::time::{Duration, Instant};

    use crate::proto::mooncake::client::{ClientConn, Limits, Req, Settle};
    use crate::proto::mooncake::tcp::Opcode;

    /// A receive being filled: its pieces, its size, and the bytes in so far.
    type Filling = (Vec<(*mut u8, usize)>, usize, usize);

    /// A driver without I/O: "sends" copy the group's pieces into `wire`, and
    /// "receives" copy scripted peer bytes into the group's pieces.
    pub struct Harness {
        pub conn: ClientConn<usize>,
        pub local: Vec<u8>,
        pub wire: Vec<u8>,
        pub settled: Vec<(usize, Settle)>,
        pub now: Instant,
        pushed: usize,
        /// The receive out: its pieces, size, and bytes filled.
        recv: Option<Filling>,
    }

    impl Harness {
        pub fn new(v2: bool, limits: Limits) -> Self {
            Self::with_crc32c(v2, false, limits)
        }

        /// A harness whose connection uses CRC-32C framing if `crc32c`.
        pub fn with_crc32c(v2: bool, crc32c: bool, limits: Limits) -> Self {
            let now = Instant::now();
            let mut conn = ClientConn::new("peer", v2, limits, now + Duration::from_secs(5)).with_crc32c(crc32c);
            conn.on_connected();
            Self { conn, local: vec![0u8; 1 << 16], wire: Vec::new(), settled: Vec::new(), now, pushed: 0, recv: None }
        }

        /// A v2 harness whose requests carry the instance tag `tag`.
        pub fn tagged(tag: u32) -> Self {
            Self::with_instance(true, false, Some(tag), Limits::default())
        }

        /// A harness with CRC-32C framing if `crc32c`, and requests tagged
        /// with `instance` if given (v2 only).
        pub fn with_instance(v2: bool, crc32c: bool, instance: Option<u32>, limits: Limits) -> Self {
            let mut h = Self::with_crc32c(v2, crc32c, limits);
            h.conn = ClientConn::new("peer", v2, limits, h.now + Duration::from_secs(5))
                .with_crc32c(crc32c)
                .with_instance(instance);
            h.conn.on_connected();
            h
        }

        /// As [`with_crc32c`](Self::with_crc32c), for a connection that
        /// proves `prover`'s key before its first request.
        pub fn with_auth(v2: bool, crc32c: bool, limits: Limits, prover: crate::proto::auth::Prover) -> Self {
            let now = Instant::now();
            let mut conn = ClientConn::new("peer", v2, limits, now + Duration::from_secs(5))
                .with_crc32c(crc32c)
                .authenticating(prover);
            conn.on_connected();
            Self { conn, local: vec![0u8; 1 << 16], wire: Vec::new(), settled: Vec::new(), now, pushed: 0, recv: None }
        }

        /// Queues request `id`: `len` bytes at `offset` of the local buffer.
        pub fn push(&mut self, op: Opcode, offset: usize, len: usize, remote: u64) -> usize {
            let id = self.pushed;
            self.pushed += 1;
            let req = Req {
                op,
                local: self.local.as_ptr() as u64 + offset as u64,
                remote,
                len: len as u64,
                deadline: self.now + Duration::from_secs(30),
                retries: 1,
                ticket: id,
            };
            assert!(self.conn.push(req).is_ok());
            id
        }

        /// Sends every group the core offers, `step` bytes at a time.
        pub fn send_all(&mut self, step: usize) {
            while let Some(g) = self.conn.poll_send() {
                let mut bytes = Vec::new();
                for (p, n) in g.pieces() {
                    // SAFETY: pieces point at the group's headers or at the
                    // harness's local buffer, both alive here.
                    bytes.extend_from_slice(unsafe { std::slice::from_raw_parts(p, n) });
                }
                assert_eq!(bytes.len(), g.total());
                self.wire.extend_from_slice(&bytes);
                for chunk in bytes.chunks(step.max(1)) {
                    self.conn.on_sent(chunk.len());
                }
                self.collect();
            }
        }

        /// Delivers peer bytes into the receive groups; returns how many the
        /// core took (it takes none it has no place for).
        pub fn feed(&mut self, mut bytes: &[u8]) -> usize {
            let mut taken = 0;
            while !bytes.is_empty() && !self.conn.is_closing() {
                if self.recv.is_none() {
                    let Some(g) = self.conn.poll_recv() else { break };
                    self.recv = Some((g.pieces(), g.total(), 0));
                }
                let (pieces, total, done) = self.recv.as_mut().expect("set above");
                let n = (*total - *done).min(bytes.len());
                scatter(pieces, *done, &bytes[..n]);
                *done += n;
                if *done == *total {
                    self.recv = None;
                }
                self.conn.on_received(n);
                bytes = &bytes[n..];
                taken += n;
                self.collect();
            }
            taken
        }

        /// Runs `finish` as a driver would once its operations are back.
        pub fn finish(&mut self) {
            assert!(self.conn.is_closing());
            self.conn.finish(self.now);
            self.collect();
        }

        pub fn collect(&mut self) {
            while let Some((r, how)) = self.conn.poll_settled() {
                self.settled.push((r.ticket, how));
            }
        }

        /// Every request pushed settled exactly once.
        pub fn assert_each_settled_once(&self) {
            let mut ids: Vec<usize> = self.settled.iter().map(|(id, _)| *id).collect();
            ids.sort_unstable();
            assert_eq!(ids, (0..self.pushed).collect::<Vec<_>>(), "settled: {:?}", self.settled);
        }

        pub fn how(&self, id: usize) -> &Settle {
            &self.settled.iter().find(|(i, _)| *i == id).expect("settled").1
        }
    }

    /// Copies `bytes` into the pieces, starting `skip` bytes in.
    pub fn scatter(pieces: &[(*mut u8, usize)], mut skip: usize, mut bytes: &[u8]) {
        for &(p, n) in pieces {
            if bytes.is_empty() {
                return;
            }
            if skip >= n {
                skip -= n;
                continue;
            }
            let k = (n - skip).min(bytes.len());
            // SAFETY: the piece is a status frame of the group or a window of
            // the harness's local buffer; `skip + k <= n` keeps it inside.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.add(skip), k) };
            bytes = &bytes[k..];
            skip = 0;
        }
        assert!(bytes.is_empty(), "more bytes than the pieces hold");
    }
}

/// Drives a [`ServerSession`](super::server::ServerSession) as if a client
/// sent it scripted bytes.
pub mod server {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Instant;

    use crate::proto::mooncake::server::{Limits, Memory, RecvPlan, ServerSession};

    /// One registered region of real memory, with a count of live pins.
    pub struct Region {
        pub bytes: Vec<u8>,
        pub pins: Rc<Cell<usize>>,
    }

    pub struct PinGuard(Rc<Cell<usize>>);

    impl Drop for PinGuard {
        fn drop(&mut self) {
            self.0.set(self.0.get() - 1);
        }
    }

    impl Region {
        pub fn new(len: usize) -> Self {
            Self { bytes: vec![0u8; len], pins: Rc::new(Cell::new(0)) }
        }

        pub fn base(&self) -> u64 {
            self.bytes.as_ptr() as u64
        }
    }

    impl Memory for Region {
        type Pin = PinGuard;

        fn pin(&self, addr: u64, len: u64) -> Option<PinGuard> {
            let inside = addr >= self.base() && addr.checked_add(len)? <= self.base() + self.bytes.len() as u64;
            inside.then(|| {
                self.pins.set(self.pins.get() + 1);
                PinGuard(self.pins.clone())
            })
        }

        fn write(&self, _pin: &PinGuard, addr: u64, bytes: &[u8]) {
            assert!(addr >= self.base() && addr + bytes.len() as u64 <= self.base() + self.bytes.len() as u64);
            // SAFETY: inside the region's buffer (checked above), which the
            // harness owns and nothing else borrows during the call.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        }

        fn crc32c(&self, _pin: &PinGuard, addr: u64, len: u64) -> u32 {
            let at = (addr - self.base()) as usize;
            crate::proto::mooncake::tcp::crc32c(&self.bytes[at..at + len as usize])
        }
    }

    /// A driver without I/O: client bytes wait in `pending` until a receive
    /// plan takes them; replies are gathered into `wire`.
    pub struct Harness {
        pub s: ServerSession<PinGuard>,
        pub mem: Region,
        pending: Vec<u8>,
        pub plan: Option<RecvPlan>,
        pub wire: Vec<u8>,
        pub receives: usize,
        pub now: Instant,
        /// Bytes per send completion.
        pub send_step: usize,
        /// Whether replies are sent at once (false: they pile up).
        pub sending: bool,
        /// The client has closed its side.
        eof: bool,
    }

    impl Harness {
        pub fn new(limits: Limits) -> Self {
            Self::with_memory(limits, 4 << 20)
        }

        /// A session over `len` bytes of registered memory.
        pub fn with_memory(limits: Limits, len: usize) -> Self {
            Self {
                s: ServerSession::new(limits),
                mem: Region::new(len),
                pending: Vec::new(),
                plan: None,
                wire: Vec::new(),
                receives: 0,
                now: Instant::now(),
                send_step: usize::MAX,
                sending: true,
                eof: false,
            }
        }

        pub fn addr(&self, offset: usize) -> u64 {
            self.mem.base() + offset as u64
        }

        /// Client bytes arrive; the session takes what its plans ask for.
        pub fn feed(&mut self, bytes: &[u8]) {
            self.pending.extend_from_slice(bytes);
            self.run();
        }

        pub fn run(&mut self) {
            loop {
                let mut progress = false;
                if self.plan.is_none() && !self.s.is_closing() {
                    self.plan = self.s.poll_recv();
                }
                if let Some(plan) = &self.plan {
                    let total: usize = plan.pieces.iter().map(|p| p.1).sum();
                    let n = total.min(self.pending.len());
                    let ready = if plan.wait_all { n == total || (self.eof && n > 0) } else { n > 0 };
                    if !ready && self.eof && n == 0 {
                        self.plan = None;
                        self.s.on_eof();
                        progress = true;
                    } else if ready {
                        scatter(&plan.pieces, &self.pending[..n]);
                        self.pending.drain(..n);
                        self.plan = None;
                        self.receives += 1;
                        self.s.on_received(n, &self.mem);
                        progress = true;
                    }
                }
                if self.sending {
                    progress |= self.send_all();
                }
                let _ = self.s.poll_half_close();
                if !progress {
                    return;
                }
            }
        }

        pub fn send_all(&mut self) -> bool {
            let mut any = false;
            while let Some(pieces) = self.s.poll_send() {
                let mut bytes = Vec::new();
                for &(p, n) in pieces {
                    // SAFETY: status frames in the session or READ sources in
                    // the harness's region, both alive here.
                    bytes.extend_from_slice(unsafe { std::slice::from_raw_parts(p, n) });
                }
                self.wire.extend_from_slice(&bytes);
                for chunk in bytes.chunks(self.send_step.max(1)) {
                    self.s.on_sent(chunk.len(), self.now, &self.mem);
                }
                any = true;
            }
            any
        }

        /// The client closes its side: the session sees the end of stream
        /// once a receive is out and every byte before it has been taken.
        pub fn eof(&mut self) {
            self.eof = true;
            self.run();
        }
    }

    pub fn scatter(pieces: &[(*mut u8, usize)], mut bytes: &[u8]) {
        for &(p, n) in pieces {
            let k = n.min(bytes.len());
            // SAFETY: a piece is staging in the session or a window of the
            // harness's region; `k <= n` keeps the copy inside it.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, k) };
            bytes = &bytes[k..];
        }
        assert!(bytes.is_empty());
    }
}
