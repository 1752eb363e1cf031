//! `shardwire stream listen` and `shardwire stream send`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardwire::proto::objstream::ObjHdr;
use shardwire::proto::objstream::checksum::{self, ChecksumError, CksumType};
use shardwire::stream::{
    Body, HandlerError, ObjReader, Receiver, RecvHandler, RxOptions, Session, Stream, StreamError, StreamOptions,
    Termination,
};

use crate::fail::Failure;
use crate::flags;

#[derive(clap::Subcommand)]
pub enum StreamCommand {
    /// Receive object streams; print one JSON line per object.
    Listen(ListenArgs),
    /// Send files, or generated objects, to a listener.
    Send(SendArgs),
}

#[derive(clap::Args)]
pub struct ListenArgs {
    /// HOST:PORT to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Endpoint names to accept (repeat for more).
    #[arg(long, required = true)]
    trname: Vec<String>,
    /// Print receive statistics to stderr every this many seconds.
    #[arg(long, value_name = "SECONDS")]
    stats_interval: Option<f64>,
    /// Say where it listens as a JSON line on stdout (before the objects'
    /// lines), and a failure as {"error": {"code", "message"}}.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct SendArgs {
    /// The listener's base URL, http://HOST:PORT.
    #[arg(long)]
    to: String,
    #[arg(long)]
    trname: String,
    /// Files to send (each as one object named after it); or --count.
    #[arg(required_unless_present = "count")]
    files: Vec<PathBuf>,
    /// Generate this many objects instead of sending files.
    #[arg(long, conflicts_with = "files")]
    count: Option<u64>,
    /// Size of generated objects (4096, 4KiB, 1MiB, ...).
    #[arg(long, default_value = "4KiB")]
    size: String,
    /// Bucket name in every header.
    #[arg(long, default_value = "bck")]
    bucket: String,
    /// Compress with LZ4 blocks of this size (64K, 256K, 1M, 4M).
    #[arg(long)]
    compress: Option<String>,
    /// Send bodies as PDUs of this many bytes (at most 128 KiB - 16).
    #[arg(long)]
    pdu: Option<String>,
    /// Ais-Caller-Id.
    #[arg(long, default_value = "shardwire-cli")]
    caller: String,
    /// Put this checksum of each object in its header, for the receiver to
    /// verify: xxhash, xxhash2, crc32c, md5, sha256 or sha512 (a file is
    /// read once more to compute it).
    #[arg(long, value_name = "TYPE")]
    checksum: Option<String>,
    /// Print the outcome and the stream's statistics as JSON at the end
    /// (with {"error": {"code", "message"}} when it failed).
    #[arg(long)]
    json: bool,
}

impl StreamCommand {
    pub fn json(&self) -> bool {
        match self {
            StreamCommand::Listen(a) => a.json,
            StreamCommand::Send(a) => a.json,
        }
    }
}

pub fn run(cmd: &StreamCommand) -> Result<(), Failure> {
    match cmd {
        StreamCommand::Listen(a) => listen(a),
        StreamCommand::Send(a) => send(a),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What `stream listen` does with each object: a JSON line on stdout, for
/// an object received whole and for one that failed its checksum.
struct Printer {
    out: Arc<Mutex<std::io::Stdout>>,
}

impl Printer {
    fn print(&self, line: &serde_json::Value) -> std::io::Result<()> {
        let mut o = self.out.lock().expect("stdout lock");
        writeln!(o, "{line}")?;
        o.flush()
    }
}

impl RecvHandler for Printer {
    fn object(&self, _: &Session, h: &ObjHdr, body: &mut ObjReader<'_>) -> Result<(), HandlerError> {
        let received = body.discard()?;
        let custom: serde_json::Map<String, serde_json::Value> =
            h.attrs.custom.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        self.print(&serde_json::json!({
            "bucket": h.bucket.name,
            "provider": h.bucket.provider,
            "name": h.name,
            "opaque": hex(&h.opaque),
            "size": h.attrs.size,
            "received": received,
            "atime": h.attrs.atime,
            "cksum_type": h.attrs.cksum_type,
            "cksum_value": h.attrs.cksum_value,
            "version": h.attrs.version,
            "custom": custom,
        }))?;
        Ok(())
    }

    /// The object failed (the stream goes on): a line that says so, in
    /// place of the object's.
    fn bad_checksum(&self, _: &Session, h: &ObjHdr, err: &ChecksumError) {
        let _ = self.print(&serde_json::json!({
            "bucket": h.bucket.name,
            "provider": h.bucket.provider,
            "name": h.name,
            "size": h.attrs.size,
            "cksum_type": h.attrs.cksum_type,
            "cksum_value": h.attrs.cksum_value,
            "error": { "code": "bad_checksum", "message": err.to_string() },
        }));
    }
}

fn listen(a: &ListenArgs) -> Result<(), Failure> {
    let stats_interval = a.stats_interval.map(|s| flags::positive_seconds("--stats-interval", s)).transpose()?;
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let mut handlers: Vec<(String, Arc<dyn RecvHandler>)> = Vec::new();
    for name in &a.trname {
        if handlers.iter().any(|(n, _)| n == name) {
            return Err(Failure::usage(format!("--trname {name:?} is given twice")));
        }
        let handler = Printer { out: out.clone() };
        handlers.push((name.clone(), Arc::new(handler)));
    }
    // Handlers are in place before the first connection is taken.
    let rx = Receiver::bind_with(a.listen, RxOptions::default(), handlers)
        .map_err(|e| Failure::new("listen", format!("cannot listen on {}: {e}", a.listen)))?;
    eprintln!("shardwire: listening on {} for {}", rx.url(), a.trname.join(", "));
    if a.json {
        let mut o = out.lock().expect("stdout lock");
        let _ = writeln!(o, "{}", serde_json::json!({ "listening": rx.url(), "trnames": a.trname }));
        let _ = o.flush();
    }
    let tick = stats_interval.unwrap_or(Duration::from_secs(3600));
    loop {
        std::thread::sleep(tick);
        if stats_interval.is_some() {
            let stats = serde_json::to_string(&rx.stats()).unwrap_or_default();
            eprintln!("{stats}");
        }
    }
}

/// `ty`'s checksum of the first `len` bytes of `file` (what goes out as
/// the object), as hex; the file is left at its start again.
fn file_checksum(file: &mut std::fs::File, len: u64, ty: CksumType) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut hasher = checksum::Hasher::new(ty);
    let mut buf = vec![0u8; 1 << 20];
    let mut piece = Read::by_ref(file).take(len);
    loop {
        match piece.read(&mut buf)? {
            0 => break,
            n => hasher.update(&buf[..n]),
        }
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(hasher.finish_hex())
}

/// "1 object", "3 objects".
fn objects(n: impl Into<i128>) -> String {
    let n = n.into();
    if n == 1 { "1 object".to_string() } else { format!("{n} objects") }
}

/// What the completions said: how many objects failed, and the first
/// failure (name and error).
#[derive(Default)]
struct Failures {
    count: u64,
    first: Option<(String, StreamError)>,
}

impl Failures {
    fn add(&mut self, name: &str, e: &StreamError) {
        self.count += 1;
        self.first.get_or_insert_with(|| (name.to_string(), e.clone()));
    }
}

fn send(a: &SendArgs) -> Result<(), Failure> {
    let compression = flags::compress(a.compress.as_deref())?;
    let pdu_size = a.pdu.as_deref().map(|p| flags::size("--pdu", p)).transpose()?;
    let size = a.count.map(|_| flags::size("--size", &a.size)).transpose()?;
    let cksum = a
        .checksum
        .as_deref()
        .map(|t| {
            CksumType::parse(t).ok_or_else(|| {
                let names: Vec<&str> = CksumType::ALL.iter().map(|c| c.as_str()).collect();
                Failure::usage(format!("--checksum {t:?} is not a checksum type ({})", names.join(", ")))
            })
        })
        .transpose()?;
    // Every file is checked before the stream opens: one that cannot be
    // read sends nothing. (Each is opened again when its turn comes, so
    // that many files do not hold as many descriptors.)
    for path in &a.files {
        let cannot = |e: std::io::Error| Failure::new("io", format!("cannot read {}: {e}", path.display()));
        if std::fs::File::open(path).and_then(|f| f.metadata()).map_err(cannot)?.is_dir() {
            return Err(Failure::new("io", format!("cannot send {}: it is a directory", path.display())));
        }
    }
    let failures = Arc::new(Mutex::new(Failures::default()));
    let f = failures.clone();
    let opts = StreamOptions {
        compression,
        pdu_size,
        caller_id: a.caller.clone(),
        checksum: cksum,
        on_sent: Some(Arc::new(move |h: &ObjHdr, r| {
            if let Err(e) = r {
                f.lock().expect("failures lock").add(&h.name, e);
            }
        })),
        ..StreamOptions::default()
    };
    let s = Stream::new(&a.to, &a.trname, opts)
        .map_err(|e| Failure::from(e).context(format!("cannot open a stream to {}", a.to)))?;
    // Objects handed to the stream. Once the stream has ended, the rest
    // would only fail one by one: stop there.
    let mut queued = 0u64;
    let mut queue = |h: ObjHdr, body: Body| match s.send(h, body) {
        Ok(()) => {
            queued += 1;
            true
        }
        Err(e) => !matches!(e, StreamError::Terminated(_)),
    };
    if let (Some(count), Some(size)) = (a.count, size) {
        let payload: Arc<[u8]> = (0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
        for i in 0..count {
            if !queue(ObjHdr::new(&a.bucket, &format!("obj-{i}"), size as i64), Body::Bytes(payload.clone())) {
                break;
            }
        }
    } else {
        for path in &a.files {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let opened = std::fs::File::open(path).and_then(|f| Ok((f.metadata()?.len(), f)));
            let (len, mut file) = match opened {
                Ok(o) => o,
                Err(e) => {
                    // Gone since the check: this object fails, the rest go.
                    let e = StreamError::Object(format!("cannot read it: {e}"));
                    failures.lock().expect("failures lock").add(&name, &e);
                    continue;
                }
            };
            let mut hdr = ObjHdr::new(&a.bucket, &name, len as i64);
            if let Some(ty) = cksum.filter(|_| len > 0) {
                // A file is read as it is sent: its checksum takes a read
                // of its own first.
                match file_checksum(&mut file, len, ty) {
                    Ok(value) => (hdr.attrs.cksum_type, hdr.attrs.cksum_value) = (ty.as_str().to_string(), value),
                    Err(e) => {
                        let e = StreamError::Object(format!("cannot read it: {e}"));
                        failures.lock().expect("failures lock").add(&name, &e);
                        continue;
                    }
                }
            }
            let body = if len == 0 { Body::Empty } else { Body::Reader(Box::new(file)) };
            if !queue(hdr, body) {
                break;
            }
        }
    }
    let how = s.fin();
    let stats = s.stats();
    let failures = failures.lock().expect("failures lock");
    let to = format!("{} (trname {:?})", a.to, a.trname);
    let failure = match &how {
        Termination::EndOfStream if failures.count == 0 => None,
        Termination::EndOfStream => {
            let (name, e) = failures.first.clone().expect("a failure was counted");
            Some(Failure::new(
                e.code(),
                format!(
                    "{} for {to} failed, the first ({name}) with: {e}; the other {} went out and the receiver \
                     acknowledged the stream",
                    objects(failures.count),
                    stats.num
                ),
            ))
        }
        Termination::Stopped => Some(Failure::new(
            "stopped",
            format!("the stream to {to} was stopped after {} ({} bytes) had gone out", objects(stats.num), stats.size),
        )),
        Termination::Error(e) if stats.num == 0 => {
            Some(Failure::new(e.code(), format!("the stream to {to} failed before any object went out: {e}")))
        }
        Termination::Error(e) => Some(Failure::new(
            e.code(),
            format!("the stream to {to} failed after {} ({} bytes) had gone out: {e}", objects(stats.num), stats.size),
        )),
    };
    if a.json {
        let mut report = serde_json::json!({
            // Acknowledged: the receiver answered the end of the stream.
            "sent": if how == Termination::EndOfStream { stats.num } else { 0 },
            "queued": queued,
            "went_out": stats.num,
            "failed": failures.count,
            "termination": match how {
                Termination::EndOfStream => "end-of-stream",
                Termination::Stopped => "stopped",
                Termination::Error(_) => "error",
            },
            "stats": stats,
        });
        if let Some(f) = &failure {
            report["error"] = f.to_json()["error"].clone();
        }
        println!("{report}");
    }
    match failure {
        None => {
            if !a.json {
                eprintln!(
                    "shardwire: sent {}, {} bytes ({} on the wire) to {to}; the receiver acknowledged them",
                    objects(stats.num),
                    stats.size,
                    stats.offset
                );
            }
            Ok(())
        }
        Some(f) => Err(f.json_printed()),
    }
}
