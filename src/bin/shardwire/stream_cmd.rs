//! `shardwire stream listen` and `shardwire stream send`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardwire::bench::stream::parse_size;
use shardwire::proto::objstream::ObjHdr;
use shardwire::proto::objstream::lz4::BlockSize;
use shardwire::stream::{
    Body, HandlerError, ObjReader, Receiver, RecvHandler, RxOptions, Stream, StreamOptions, Termination,
};

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
}

#[derive(clap::Args)]
pub struct SendArgs {
    /// The listener's base URL, http://HOST:PORT.
    #[arg(long)]
    to: String,
    #[arg(long)]
    trname: String,
    /// Files to send (each as one object named after it).
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
    /// Print the stream's statistics as JSON at the end.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: &StreamCommand) -> Result<(), String> {
    match cmd {
        StreamCommand::Listen(a) => listen(a),
        StreamCommand::Send(a) => send(a),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn listen(a: &ListenArgs) -> Result<(), String> {
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let mut handlers: Vec<(String, Arc<dyn RecvHandler>)> = Vec::new();
    for name in &a.trname {
        let out = out.clone();
        let handler = move |h: &ObjHdr, body: &mut ObjReader<'_>| -> Result<(), HandlerError> {
            let received = body.discard()?;
            let custom: serde_json::Map<String, serde_json::Value> =
                h.attrs.custom.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
            let line = serde_json::json!({
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
            });
            let mut o = out.lock().expect("stdout lock");
            writeln!(o, "{line}")?;
            o.flush()?;
            Ok(())
        };
        handlers.push((name.clone(), Arc::new(handler)));
    }
    // Handlers are in place before the first connection is taken.
    let rx = Receiver::bind_with(a.listen, RxOptions::default(), handlers)
        .map_err(|e| format!("listen on {}: {e}", a.listen))?;
    eprintln!("shardwire: listening on {} for {}", rx.url(), a.trname.join(", "));
    let tick = a.stats_interval.map(Duration::from_secs_f64).unwrap_or(Duration::from_secs(3600));
    loop {
        std::thread::sleep(tick);
        if a.stats_interval.is_some() {
            let stats = serde_json::to_string(&rx.stats()).unwrap_or_default();
            eprintln!("{stats}");
        }
    }
}

fn send(a: &SendArgs) -> Result<(), String> {
    let compression = match &a.compress {
        None => None,
        Some(b) => Some(BlockSize::parse(b).ok_or_else(|| format!("--compress {b}: use 64K, 256K, 1M or 4M"))?),
    };
    let pdu_size = match &a.pdu {
        None => None,
        Some(p) => Some(parse_size(p).ok_or_else(|| format!("--pdu {p}: not a size"))?),
    };
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let f = failures.clone();
    let opts = StreamOptions {
        compression,
        pdu_size,
        caller_id: a.caller.clone(),
        on_sent: Some(Arc::new(move |h: &ObjHdr, r| {
            if let Err(e) = r {
                f.lock().expect("failures lock").push(format!("{}: {e}", h.name));
            }
        })),
        ..StreamOptions::default()
    };
    let s = Stream::new(&a.to, &a.trname, opts).map_err(|e| e.to_string())?;
    let mut sent = 0u64;
    if let Some(count) = a.count {
        let size = parse_size(&a.size).ok_or_else(|| format!("--size {}: not a size", a.size))?;
        let payload: Arc<[u8]> = (0..size).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
        for i in 0..count {
            let h = ObjHdr::new(&a.bucket, &format!("obj-{i}"), size as i64);
            if s.send(h, payload.clone()).is_ok() {
                sent += 1;
            }
        }
    } else {
        for path in &a.files {
            let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let len = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?.len();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let h = ObjHdr::new(&a.bucket, &name, len as i64);
            let body = if len == 0 { Body::Empty } else { Body::Reader(Box::new(file)) };
            if s.send(h, body).is_ok() {
                sent += 1;
            }
        }
    }
    let how = s.fin();
    let stats = s.stats();
    if a.json {
        println!("{}", serde_json::json!({ "sent": sent, "termination": format!("{how:?}"), "stats": stats }));
    } else {
        eprintln!("shardwire: sent {} objects, {} bytes (offset {}); {how:?}", stats.num, stats.size, stats.offset);
    }
    let failures = failures.lock().expect("failures lock");
    for f in failures.iter() {
        eprintln!("shardwire: {f}");
    }
    match how {
        Termination::EndOfStream if failures.is_empty() => Ok(()),
        Termination::EndOfStream => Err(format!("{} objects failed", failures.len())),
        other => Err(format!("the stream ended with {other:?}")),
    }
}
