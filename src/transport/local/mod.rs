//! The local transport: transfers between engines on one host, by memory
//! copies in the caller's thread instead of TCP.
//!
//! An engine with the local transport on publishes, in its segment
//! descriptor, its host's boot id, its pid, a random token and the Unix
//! socket of its [`service::Service`]. A peer whose boot id is the same
//! connects there (once), and gets the target's [`control::Table`]; from
//! then on it copies:
//!
//! - into and out of **managed memory** (the target's memfds, which the
//!   peer maps once each): a plain `memcpy`, no syscall;
//! - into and out of **other registered memory**: cross-memory attach
//!   (`process_vm_writev` / `process_vm_readv`), one syscall per request.
//!
//! Every copy runs inside the control table's lane protocol, so once the
//! target's `unregister_memory`, `free_managed_buffer` or shutdown returns,
//! no byte from a peer lands in that memory. A request the local path
//! cannot carry (the socket is in another network namespace, the kernel
//! refuses cross-memory attach, the target's table is full, no lane is
//! free) goes over TCP instead; the first refusal of a kind is logged once,
//! with why. Mooncake peers carry no such descriptor field and stay on TCP.
//!
//! - [`control`]: the control table shared with peers (what may be
//!   written, and who writes it now): no late writes.
//! - [`service`]: the Unix socket that hands a peer the table and the
//!   memfds of managed memory.
//! - `crew`: helper threads that share the pieces of a large copy with
//!   the caller (`SHARDWIRE_LOCAL_THREADS`).

pub mod control;
mod crew;
mod lanes;
pub mod service;

use crate::telemetry::{Event, counters as telemetry};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use super::request::{Opcode, Request, Sink, TransferStatus};
use super::tcp::TcpTransport;
use super::{InlineRequest, PeerSegment, Route, Transport};
use crate::error::{TeError, TeResult, code};
use crate::mem::managed::ShmFiles;
use crate::proto::mooncake::message::LocalDesc;
use control::{Kind, SlotView, Table};
use crew::Split;
use service::{Link, Service};

/// Peers (targets this engine copies to) kept at once.
const PEERS_MAX: usize = 4096;
/// How copies into memfds are shared with the crew: from 1 MiB on, in
/// pieces of 512 KiB or more (`tools/bench-local`, 2026-12-02: 1 MiB
/// copies 1.3-1.7x faster on two threads; smaller pieces gained nothing).
const SHM_SPLIT: Split = Split { min_bytes: 512 << 10, align: 64 };
/// How cross-memory attach is shared: from 2 MiB on, in pieces that meet
/// at 2 MiB boundaries of the target's memory (one page table each). Two
/// threads in one 1 MiB copy ran at half the speed of one alone; aligned
/// pieces of a 16 MiB copy gain 1.7x.
const CMA_SPLIT: Split = Split { min_bytes: 1 << 20, align: 2 << 20 };
/// Batches of smaller requests are shared in groups of this many bytes.
const BATCH_GROUP_BYTES: u64 = 1 << 20;

/// This host's boot id.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn random_token() -> u64 {
    // Never 0 (0 means "no token").
    u64::from_le_bytes(crate::entropy::bytes()) | 1
}

/// The slots this target has open, by buffer address.
#[derive(Default)]
struct SlotBook {
    by_addr: BTreeMap<u64, u32>,
    free: Vec<u32>,
    next: u32,
}

/// A mapping of one of a target's memfds in this process.
struct Mapped {
    base: *mut u8,
    len: u64,
}

// SAFETY: a shared mapping; copies into it are ordered by the control
// table's protocol, not by Rust ownership.
unsafe impl Send for Mapped {}
// SAFETY: as above.
unsafe impl Sync for Mapped {}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Peer::mapping`.
        unsafe { libc::munmap(self.base.cast(), self.len as usize) };
    }
}

/// A target this engine copies to.
struct Peer {
    token: u64,
    name: String,
    table: Table,
    link: Link,
    views: RwLock<Vec<SlotView>>,
    maps: Mutex<HashMap<u32, Arc<Mapped>>>,
    /// The lanes this process's threads hold in the target's table, as
    /// `(lane, owner)`: given back when their thread ends or this goes.
    lanes: Mutex<Vec<(u32, u64)>>,
    /// The kernel refused cross-memory attach to it: those requests go over TCP.
    cma_refused: AtomicBool,
    /// The target process, as this process's pid namespace numbers it
    /// (the socket's peer credentials): cross-memory attach goes there.
    pid: u32,
    /// A pidfd of the target process: readable once it has exited, so a
    /// copy is known to have reached a live process (one poll, no matter
    /// how many processes have come and gone since). `None` where the
    /// kernel has none (before 5.3): then `kill(pid, 0)` and `/proc`.
    pidfd: Option<OwnedFd>,
    dead: AtomicBool,
}

/// A request's result, filled in by whichever thread carried it out.
type Outcome = Mutex<Option<Result<(), Miss>>>;

/// Why the local path did not carry a request.
enum Miss {
    /// TCP carries it instead.
    Fallback,
    /// It fails, as it would over TCP.
    Fail(TransferStatus, String),
    /// The target process it was addressed to has exited (or shut its
    /// sharing down): it fails as gone, and is not sent elsewhere.
    Gone(String),
}

thread_local! {
    /// This thread's lanes in the tables of the targets it copies to.
    static LANES: RefCell<Lanes> = RefCell::new(Lanes::default());
}

/// A thread's lanes; given back when the thread ends.
#[derive(Default)]
struct Lanes {
    held: Vec<(u64, u32, u64, Weak<Peer>)>,
}

impl Drop for Lanes {
    fn drop(&mut self) {
        for (_, lane, owner, peer) in self.held.drain(..) {
            if let Some(p) = peer.upgrade() {
                p.lanes.lock().unwrap_or_else(|e| e.into_inner()).retain(|&(l, _)| l != lane);
                p.table.release_lane(lane, owner);
            }
        }
    }
}

impl Drop for Peer {
    /// No copy runs (each holds the `Arc`): the lanes go back to the
    /// target, whose table would otherwise fill with lanes of the living.
    fn drop(&mut self) {
        for (lane, owner) in self.lanes.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            self.table.release_lane(lane, owner);
        }
    }
}

static NEXT_THREAD: AtomicU32 = AtomicU32::new(1);

thread_local! {
    static THREAD_SERIAL: u32 = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
}

/// The lane owner word of the calling thread.
fn owner_word() -> u64 {
    (u64::from(std::process::id()) << 32) | u64::from(THREAD_SERIAL.with(|s| *s))
}

/// One engine's local transport: its own table and service (as a target),
/// and the targets it copies to (as an initiator).
pub struct LocalTransport {
    desc: LocalDesc,
    table: Arc<Table>,
    book: Mutex<SlotBook>,
    service: Service,
    drain: Duration,
    tcp: Arc<TcpTransport>,
    /// The threads that share large copies with their caller.
    crew: crew::Crew,
    peers: Mutex<HashMap<u64, Arc<Peer>>>,
    /// Targets whose local path failed, and why (logged once each).
    refused: Mutex<HashMap<u64, String>>,
    closed: AtomicBool,
    /// The process that started it: a forked child shares the table's
    /// mapping and must not shut its parent's sharing down.
    owner_pid: u32,
}

impl LocalTransport {
    /// Starts the table and the service. `files` are the engine's managed
    /// memfds; `tcp` carries what this transport cannot; `drain` bounds
    /// how long a revoke waits for copies to end; `copy_threads` (the
    /// caller among them) share each large copy.
    pub fn start(
        files: Arc<ShmFiles>,
        tcp: Arc<TcpTransport>,
        drain: Duration,
        copy_threads: usize,
    ) -> std::io::Result<LocalTransport> {
        let pid = std::process::id();
        let token = random_token();
        let table = Arc::new(Table::create(pid)?);
        let name = format!("shardwire-local-{pid}-{token:016x}");
        let service = Service::start(&name, token, table.fd().clone(), files)?;
        let desc = LocalDesc { boot_id: boot_id(), pid, socket: service.address(), token };
        Ok(LocalTransport {
            desc,
            table,
            book: Mutex::new(SlotBook::default()),
            service,
            drain,
            tcp,
            crew: crew::Crew::new(copy_threads),
            peers: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            owner_pid: pid,
        })
    }

    /// What the descriptor says of this engine.
    pub fn descriptor(&self) -> LocalDesc {
        self.desc.clone()
    }

    // --- As a target -------------------------------------------------------

    /// Lets peers copy into and out of `[addr, addr + len)`: managed memory
    /// at `place`, or (`None`) other registered memory. A full table is not
    /// an error: peers then reach the buffer over TCP.
    pub fn publish(&self, addr: u64, len: u64, place: Option<crate::mem::managed::ShmPlace>) {
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        if book.by_addr.contains_key(&addr) {
            return;
        }
        let slot = match book.free.pop() {
            Some(s) => s,
            None if book.next < control::SLOTS_MAX => {
                book.next += 1;
                book.next - 1
            }
            None => {
                log::warn!(
                    "local transport: {} buffers shared; [{addr:#x}, +{len}) is reached over TCP",
                    control::SLOTS_MAX
                );
                return;
            }
        };
        let kind = place.map_or(Kind::Cma, |p| Kind::Shm { file: p.file, offset: p.offset });
        self.table.open(slot, addr, len, kind);
        book.by_addr.insert(addr, slot);
    }

    /// Takes `[addr, ...)` back from peers: when this returns `Ok`, no peer
    /// copy touches it again. Copies still running after the drain time:
    /// `BATCH_BUSY` (no new one starts; call again).
    pub fn revoke(&self, addr: u64) -> TeResult<()> {
        let slot = match self.book.lock().unwrap_or_else(|e| e.into_inner()).by_addr.get(&addr) {
            Some(&s) => s,
            None => return Ok(()), // never shared (or already taken back)
        };
        match self.table.revoke(slot, Instant::now() + self.drain) {
            Ok(()) => {
                let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
                if book.by_addr.remove(&addr) == Some(slot) {
                    book.free.push(slot);
                }
                Ok(())
            }
            Err(n) => Err(TeError::new(
                code::BATCH_BUSY,
                format!("region {addr:#x} still has {n} copies from peers on this host in flight"),
            )),
        }
    }

    /// Copies by peers running in this target's memory now.
    pub fn copies_running(&self) -> usize {
        self.table.busy_lanes()
    }

    // --- As an initiator ---------------------------------------------------

    /// Carries out `requests` to `peer`, each with its result: one after
    /// another (a large one in pieces shared with the crew), or, when many
    /// smaller ones add up to several pieces' worth, in groups shared among
    /// the crew's threads (each copy inside its own thread's lane).
    fn copy_all(&self, peer: &Arc<Peer>, requests: &[Request]) -> Vec<Result<(), Miss>> {
        let piece_bytes = BATCH_GROUP_BYTES;
        let total: u64 = requests.iter().map(|r| r.len).sum();
        let largest = requests.iter().map(|r| r.len).max().unwrap_or(0);
        if requests.len() < 2 || largest >= 2 * piece_bytes || total < 2 * piece_bytes {
            return requests.iter().map(|r| peer.copy(Some(&self.crew), r.op, r.local, r.remote, r.len)).collect();
        }
        // Groups of consecutive requests of a piece's worth each (more,
        // past the crew's limit on pieces).
        let group_bytes = piece_bytes.max(total.div_ceil(crew::PIECES_MAX));
        let mut starts = vec![0usize];
        let mut bytes = 0;
        for (i, r) in requests.iter().enumerate().take(requests.len() - 1) {
            bytes += r.len;
            if bytes >= group_bytes {
                starts.push(i + 1);
                bytes = 0;
            }
        }
        starts.push(requests.len());
        assert!(starts.len() >= 2 && starts.len() as u64 <= crew::PIECES_MAX + 1);
        let work: Arc<Vec<(Opcode, u64, u64, u64)>> =
            Arc::new(requests.iter().map(|r| (r.op, r.local, r.remote, r.len)).collect());
        let results: Arc<Vec<Outcome>> = Arc::new(requests.iter().map(|_| Mutex::new(None)).collect());
        let (p, w, out) = (peer.clone(), work.clone(), results.clone());
        let groups = starts.len() as u32 - 1;
        let shared = self.crew.run(groups, move |g| {
            for i in starts[g as usize]..starts[g as usize + 1] {
                let (op, local, remote, len) = w[i];
                *out[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(p.copy(None, op, local, remote, len));
            }
            Ok(())
        });
        debug_assert!(shared.is_ok(), "a group reports through its requests' results");
        results
            .iter()
            .map(|r| {
                r.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_else(|| {
                    Err(Miss::Fail(TransferStatus::Failed, "a request of a shared batch was not carried out".into()))
                })
            })
            .collect()
    }

    /// Logs, once per target, why its local path is not used.
    fn refuse(&self, token: u64, name: &str, why: String) {
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if refused.len() < PEERS_MAX && !refused.contains_key(&token) {
            log::info!("local transport to {name}: {why}; using TCP");
            refused.insert(token, why);
        }
    }

    /// Why a request to a target this transport let go of fails.
    fn let_go_why(&self) -> String {
        if self.closed.load(Ordering::Acquire) {
            "the engine is shutting down".into()
        } else {
            "the target process it was addressed to has exited or been replaced under its name".into()
        }
    }

    fn peer(&self, token: u64) -> Option<Arc<Peer>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).get(&token).cloned()
    }

    /// The target `ld` describes, connected once.
    fn connect(&self, name: &str, ld: &LocalDesc) -> Option<Arc<Peer>> {
        if let Some(p) = self.peer(ld.token)
            && !p.dead.load(Ordering::Acquire)
        {
            return Some(p);
        }
        if self.refused.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&ld.token) {
            return None;
        }
        let (link, fd) = match Link::connect(&ld.socket, ld.token) {
            Ok(x) => x,
            Err(e) => {
                self.refuse(ld.token, name, format!("cannot reach {} ({e}; another network namespace?)", ld.socket));
                return None;
            }
        };
        let table = match Table::attach(fd) {
            Ok(t) => t,
            Err(e) => {
                self.refuse(ld.token, name, format!("its control table: {e}"));
                return None;
            }
        };
        // The process at the other end of the link, numbered in this pid
        // namespace; the pidfd is opened while the link is up, so it is
        // that process's (a pid is not reused while its process lives),
        // which the look at the link after it confirms.
        // A target this pid namespace cannot see (its credentials say pid
        // 0) could be neither watched nor reached by cross-memory attach:
        // it is reached over TCP.
        let pid = match link.peer_pid() {
            Ok(pid) => pid,
            Err(e) => {
                self.refuse(ld.token, name, format!("its process is not visible from here ({e})"));
                return None;
            }
        };
        let pidfd = pidfd_open(pid);
        if link.is_closed() || pidfd.as_ref().is_some_and(exited) {
            log::debug!("local transport: {name} exited as it was connected");
            return None;
        }
        let peer = Arc::new(Peer {
            token: ld.token,
            name: name.to_string(),
            views: RwLock::new(table.open_slots()),
            table,
            link,
            maps: Mutex::new(HashMap::new()),
            lanes: Mutex::new(Vec::new()),
            cma_refused: AtomicBool::new(false),
            pid,
            pidfd,
            dead: AtomicBool::new(false),
        });
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        // A new target process: let go of the ones it replaced (a target
        // that restarted comes back under its name with a new token) and
        // of those that have exited. Nothing else looks at them again, and
        // each holds a socket, the target's control table and mappings of
        // its memory (which would stay resident while mapped). Copies still
        // running hold their own `Arc`; routes that still name an old token
        // find no peer and go over TCP.
        let before = peers.len();
        peers.retain(|_, p| p.name != name && !p.gone());
        if peers.len() < before {
            log::debug!("local transport: let go of {} peer(s) that restarted or exited", before - peers.len());
        }
        if peers.len() >= PEERS_MAX {
            return None;
        }
        peers.insert(ld.token, peer.clone());
        debug_assert!(peers.len() <= PEERS_MAX);
        Some(peer)
    }
}

impl Peer {
    /// Carries out one request locally, or says why not; a large one in
    /// pieces shared with `crew`, if given.
    fn copy(
        self: &Arc<Self>,
        crew: Option<&crew::Crew>,
        op: Opcode,
        local: u64,
        remote: u64,
        len: u64,
    ) -> Result<(), Miss> {
        if self.dead.load(Ordering::Acquire) || !self.table.target_live() {
            return Err(Miss::Gone(self.gone_why()));
        }
        let Some(lane) = lane_for(self) else { return Err(Miss::Fallback) };
        let mut view = self.find(remote, len);
        for attempt in 0..2 {
            let Some(v) = view else {
                if attempt == 0 {
                    view = self.refresh_find(remote, len);
                    continue;
                }
                return Err(Miss::Fail(
                    TransferStatus::Failed,
                    format!(
                        "{} rejected a {op:?} of {len} bytes at {remote:#x}: not inside a buffer it has registered",
                        self.name
                    ),
                ));
            };
            if let Kind::Cma = v.kind
                && self.cma_refused.load(Ordering::Relaxed)
            {
                return Err(Miss::Fallback);
            }
            if !self.table.enter(lane, &v) {
                // Revoked, or reopened for another buffer: look once more.
                view = if attempt == 0 { self.refresh_find(remote, len) } else { None };
                continue;
            }
            let result = self.copy_entered(crew, &v, op, local, remote, len);
            self.table.exit(lane);
            return result;
        }
        Err(Miss::Fail(
            TransferStatus::Failed,
            format!("{} rejected a {op:?} at {remote:#x}: the buffer there was unregistered", self.name),
        ))
    }

    /// The copy itself, inside the lane protocol: in pieces shared with
    /// the crew when it is large, all done when this returns.
    fn copy_entered(
        self: &Arc<Self>,
        crew: Option<&crew::Crew>,
        v: &SlotView,
        op: Opcode,
        local: u64,
        remote: u64,
        len: u64,
    ) -> Result<(), Miss> {
        match v.kind {
            Kind::Shm { file, offset } => {
                let map = self.mapping(file).map_err(|e| Miss::Fail(TransferStatus::Failed, e))?;
                let at = offset + (remote - v.addr);
                if at.checked_add(len).is_none_or(|end| end > map.len) {
                    return Err(Miss::Fail(TransferStatus::Failed, format!("{}: a buffer past its memfd", self.name)));
                }
                let piece = move |from: u64, n: u64| {
                    debug_assert!(from + n <= len);
                    // SAFETY: `at+from..at+from+n` lies inside the mapping
                    // (checked above), which the Arc keeps mapped; the
                    // local side is registered memory the caller pinned;
                    // the slot is open and the caller's lane names it until
                    // every piece has ended, so the target does not give
                    // the memory away under a piece.
                    unsafe {
                        let there = map.base.add((at + from) as usize);
                        let here = (local + from) as *mut u8;
                        match op {
                            Opcode::Write => std::ptr::copy_nonoverlapping(here as *const u8, there, n as usize),
                            Opcode::Read => std::ptr::copy_nonoverlapping(there as *const u8, here, n as usize),
                        }
                    }
                    Ok(())
                };
                match crew {
                    Some(crew) => crew.copy(len, at, SHM_SPLIT, piece),
                    None => piece(0, len),
                }
            }
            // Cross-memory attach names the target by pid: once the target
            // has exited, its pid may go to another process, whose memory
            // must never be written. So the pidfd is looked at first (a
            // pid is taken again only after a wrap of the pid space, not
            // within the microseconds before the copy).
            Kind::Cma if !self.alive() => Err(Miss::Gone(self.gone_why())),
            Kind::Cma => match crew {
                Some(crew) => {
                    let peer = self.clone();
                    crew.copy(len, remote, CMA_SPLIT, move |from, n| peer.cma(op, local + from, remote + from, n))
                }
                None => self.cma(op, local, remote, len),
            },
        }
    }

    /// Whether the target has exited or shut its sharing down, looked at
    /// now (a syscall or two).
    fn gone(&self) -> bool {
        !self.alive() || self.link.is_closed()
    }

    /// Whether the target process is up and sharing, looked at now: one
    /// poll of its pidfd. Run after each copy (or run of copies): a copy
    /// counts as done only if its target was alive once it ended, so bytes
    /// copied into the memory of a process that has died (a memfd stays
    /// mapped here) are never reported as written.
    fn alive(&self) -> bool {
        if self.dead.load(Ordering::Acquire) || !self.table.target_live() {
            return false;
        }
        let gone = match &self.pidfd {
            Some(fd) => exited(fd),
            None => control::is_dead(self.pid),
        };
        if gone {
            self.dead.store(true, Ordering::Release);
        }
        !gone
    }

    /// Why copies to the target fail now.
    fn gone_why(&self) -> String {
        if self.table.target_live() {
            format!("{} (pid {}) has exited", self.name, self.pid)
        } else {
            format!("{} (pid {}) has shut down", self.name, self.pid)
        }
    }

    /// Cross-memory attach into the target's registered memory.
    fn cma(&self, op: Opcode, local: u64, remote: u64, len: u64) -> Result<(), Miss> {
        let pid = self.pid as libc::pid_t;
        let mut done = 0u64;
        while done < len {
            let l = libc::iovec { iov_base: (local + done) as *mut libc::c_void, iov_len: (len - done) as usize };
            let r = libc::iovec { iov_base: (remote + done) as *mut libc::c_void, iov_len: (len - done) as usize };
            // SAFETY: the local iovec is pinned registered memory of this
            // process; the kernel reads or writes the target's side through
            // its page tables and reports EFAULT for what is not mapped.
            let n = unsafe {
                match op {
                    Opcode::Write => libc::process_vm_writev(pid, &l, 1, &r, 1, 0),
                    Opcode::Read => libc::process_vm_readv(pid, &l, 1, &r, 1, 0),
                }
            };
            if n > 0 {
                done += n as u64;
                continue;
            }
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::ENOSYS) | Some(libc::EACCES) if done == 0 => {
                    if !self.cma_refused.swap(true, Ordering::Relaxed) {
                        log::info!(
                            "local transport to {}: cross-memory attach refused ({e}); its registered memory is reached over TCP",
                            self.name
                        );
                    }
                    Miss::Fallback
                }
                Some(libc::ESRCH) => {
                    self.dead.store(true, Ordering::Release);
                    Miss::Gone(self.gone_why())
                }
                _ => Miss::Fail(
                    TransferStatus::Failed,
                    format!("{}: cross-memory attach at {:#x}: {e}", self.name, remote + done),
                ),
            });
        }
        Ok(())
    }

    fn find(&self, addr: u64, len: u64) -> Option<SlotView> {
        let views = self.views.read().unwrap_or_else(|e| e.into_inner());
        let i = views.partition_point(|v| v.addr <= addr);
        views[..i].last().filter(|v| v.contains(addr, len)).copied()
    }

    /// Reads the table again; mappings of memfds no open slot uses any
    /// more are let go (the target freed them; a copy running in one
    /// keeps it mapped until it ends).
    fn refresh_find(&self, addr: u64, len: u64) -> Option<SlotView> {
        let views = self.table.open_slots();
        let used: std::collections::HashSet<u32> = views
            .iter()
            .filter_map(|v| match v.kind {
                Kind::Shm { file, .. } => Some(file),
                Kind::Cma => None,
            })
            .collect();
        self.maps.lock().unwrap_or_else(|e| e.into_inner()).retain(|file, _| used.contains(file));
        *self.views.write().unwrap_or_else(|e| e.into_inner()) = views;
        self.find(addr, len)
    }

    /// This process's mapping of the target's memfd `file`, made once.
    fn mapping(&self, file: u32) -> Result<Arc<Mapped>, String> {
        if let Some(m) = self.maps.lock().unwrap_or_else(|e| e.into_inner()).get(&file) {
            return Ok(m.clone());
        }
        let (fd, len): (OwnedFd, u64) =
            self.link.memfd(file).map_err(|e| format!("{}: memfd {file}: {e}", self.name))?;
        // SAFETY: maps the target's memfd, shared; no memory of ours is
        // touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("{}: mapping memfd {file}: {}", self.name, std::io::Error::last_os_error()));
        }
        let m = Arc::new(Mapped { base: ptr.cast(), len });
        self.maps.lock().unwrap_or_else(|e| e.into_inner()).insert(file, m.clone());
        Ok(m)
    }
}

/// A pidfd for process `pid` (Linux 5.3), or `None` if the kernel has
/// none to give (the caller then falls back to `kill(pid, 0)`).
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: a plain syscall; a descriptor it returns is wrapped at once.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        log::debug!("local transport: pidfd_open({pid}): {}", std::io::Error::last_os_error());
        return None;
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the process of `pidfd` has exited (its pidfd polls readable).
fn exited(pidfd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: polls one live descriptor without waiting.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
}

/// The calling thread's lane in `peer`'s table, claimed on first use.
fn lane_for(peer: &Arc<Peer>) -> Option<u32> {
    LANES
        .try_with(|lanes| {
            let mut lanes = lanes.borrow_mut();
            if let Some(&(_, lane, _, _)) =
                lanes.held.iter().find(|(t, _, _, p)| *t == peer.token && p.strong_count() > 0)
            {
                return Some(lane);
            }
            // A first copy to this target from this thread: forget the
            // lanes of targets let go since (their `Peer` gave them back).
            lanes.held.retain(|(_, _, _, p)| p.strong_count() > 0);
            let owner = owner_word();
            let lane = peer.table.claim_lane(owner)?;
            peer.lanes.lock().unwrap_or_else(|e| e.into_inner()).push((lane, owner));
            lanes.held.push((peer.token, lane, owner, Arc::downgrade(peer)));
            Some(lane)
        })
        .ok()
        .flatten()
}

impl Transport for LocalTransport {
    fn name(&self) -> &'static str {
        "local"
    }

    fn route(&self, peer: &PeerSegment<'_>) -> TeResult<Option<Route>> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(None);
        }
        let Some(ld) = &peer.desc.shardwire else { return Ok(None) };
        if ld.boot_id.is_empty() || ld.boot_id != self.desc.boot_id {
            return Ok(None);
        }
        let Some(Route::Tcp(tcp)) = self.tcp.route(peer)? else { return Ok(None) };
        if self.connect(peer.name, ld).is_none() {
            return Ok(None);
        }
        Ok(Some(Route::Local { token: ld.token, tcp }))
    }

    fn submit(&self, route: &Route, requests: Vec<Request>) {
        let Route::Local { token, tcp } = *route else {
            for r in requests {
                r.ticket.fail(TransferStatus::Failed, "a request for another transport reached the local one");
            }
            return;
        };
        let Some(peer) = self.peer(token) else {
            let why = self.let_go_why();
            for r in requests {
                r.ticket.fail_gone(&why);
            }
            return;
        };
        let mut results = self.copy_all(&peer, &requests);
        debug_assert_eq!(results.len(), requests.len());
        // Done only if the target outlived the copies (see `Peer::alive`).
        if results.iter().any(Result::is_ok) && !peer.alive() {
            let why = peer.gone_why();
            for r in results.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(Miss::Gone(why.clone()));
            }
        }
        let mut over_tcp = Vec::new();
        for (r, result) in requests.into_iter().zip(results) {
            match result {
                Ok(()) => r.ticket.done(r.len),
                Err(Miss::Fail(status, why)) => r.ticket.fail(status, &why),
                Err(Miss::Gone(why)) => r.ticket.fail_gone(&why),
                Err(Miss::Fallback) => over_tcp.push(r),
            }
        }
        if !over_tcp.is_empty() {
            for _ in &over_tcp {
                telemetry::event(Event::LocalToTcp);
            }
            self.tcp.submit(&Route::Tcp(tcp), over_tcp);
        }
    }

    fn run_inline(&self, route: &Route, r: &InlineRequest) -> Option<TeResult<()>> {
        let Route::Local { token, tcp } = *route else { return None };
        let Some(peer) = self.peer(token) else {
            return Some(Err(TeError::new(code::PEER_GONE, self.let_go_why())));
        };
        match peer.copy(Some(&self.crew), r.op, r.local, r.remote, r.len) {
            // Done only if the target outlived the copy (see `Peer::alive`).
            Ok(()) if peer.alive() => Some(Ok(())),
            Ok(()) | Err(Miss::Gone(_)) => Some(Err(TeError::new(code::PEER_GONE, peer.gone_why()))),
            Err(Miss::Fail(_, why)) => Some(Err(TeError::invalid(why))),
            Err(Miss::Fallback) => {
                telemetry::event(Event::LocalToTcp);
                self.tcp.run_inline(&Route::Tcp(tcp), r)
            }
        }
    }

    /// Whole requests: large ones are cut into pieces for the crew here,
    /// all under the caller's lane. (One the local path hands to TCP goes
    /// whole too, over one connection.)
    fn stripes(&self) -> bool {
        false
    }

    fn cancel(&self, _sink: &Arc<dyn Sink>) {
        // Local requests complete in `submit`; nothing waits here. Those
        // handed to TCP are cancelled by the TCP transport.
    }

    /// Lets go of the target process: its socket, table and mappings go
    /// once no copy holds them, and later requests that name it fail as
    /// gone (copies running now end as they would have).
    fn retire(&self, route: &Route) {
        let Route::Local { token, .. } = *route else { return };
        if self.peers.lock().unwrap_or_else(|e| e.into_inner()).remove(&token).is_some() {
            log::debug!("local transport: let go of a target process that was replaced");
        }
    }

    /// Stops sharing: no peer copy starts from now on, and the ones running
    /// end before this returns (bounded by the drain time); the service
    /// stops; targets this engine copied to are let go.
    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) || std::process::id() != self.owner_pid {
            return;
        }
        self.table.shut_down();
        let slots: Vec<(u64, u32)> =
            self.book.lock().unwrap_or_else(|e| e.into_inner()).by_addr.iter().map(|(&a, &s)| (a, s)).collect();
        let deadline = Instant::now() + self.drain;
        for (addr, slot) in slots {
            if let Err(n) = self.table.revoke(slot, deadline) {
                log::warn!("local transport: {n} peer copies into {addr:#x} still running at shutdown");
            }
        }
        self.service.stop();
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl Drop for LocalTransport {
    fn drop(&mut self) {
        self.close();
    }
}
