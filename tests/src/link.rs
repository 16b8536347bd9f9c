//! A faulty link for tests and benchmarks: a userspace TCP proxy on
//! 127.0.0.1 in front of one target address, since this machine's kernel has
//! no netem.
//!
//! Goals: per-direction one-way delay as a delay line (each chunk is released
//! at its arrival plus the delay, so a delayed link still carries its full
//! rate: throughput is not divided by the round trip); a bandwidth cap per
//! direction (a token bucket shared by all connections of the link, as one
//! cable is); [`Link::cut`], which drops every connection and refuses new
//! ones until [`Link::restore`]; byte counters per direction, so a test can
//! prove its bytes crossed the link. The target may live in a network
//! namespace ([`LinkConfig::target_netns`]), so the link is the only way in.
//!
//! Non-goals: packet loss, reordering, jitter, UDP. Buffering is bounded
//! (about 16 MiB per direction and connection) but generous, like a deep
//! router queue.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a [`Link`] behaves.
#[derive(Debug, Clone, Default)]
pub struct LinkConfig {
    /// Added to each direction (round trip = 2 × delay).
    pub delay: Duration,
    /// Bytes per second in each direction; `None`: as fast as it goes.
    pub rate: Option<u64>,
    /// Dial the target inside this network namespace (see [`crate::netns`]).
    pub target_netns: Option<PathBuf>,
}

impl LinkConfig {
    /// A link with one-way `delay` and `rate` bytes/s each way.
    pub fn new(delay: Duration, rate: Option<u64>) -> Self {
        Self {
            delay,
            rate,
            target_netns: None,
        }
    }

    /// The same link, dialling its target inside the namespace at `path`.
    pub fn into_netns(mut self, path: PathBuf) -> Self {
        self.target_netns = Some(path);
        self
    }
}

/// A running link; dropping it closes the listener and every connection.
#[derive(Debug)]
pub struct Link {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// Largest chunk read at once; the cap shrinks it (about 10 ms of rate).
const MAX_CHUNK: usize = 64 * 1024;
/// Chunks queued per direction and connection (bounds memory: 16 MiB).
const QUEUE_CHUNKS: usize = 256;
/// How long dialling the target may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    delay: Duration,
    chunk: usize,
    /// Client to target, and target to client.
    buckets: [Option<Mutex<Bucket>>; 2],
    delivered: [AtomicU64; 2],
    accepted: AtomicU64,
    cut: AtomicBool,
    stopped: AtomicBool,
    conns: Mutex<HashMap<u64, [TcpStream; 2]>>,
    next_id: AtomicU64,
    dialer: Dialer,
}

/// Token bucket with debt: a taker subtracts what it sends and sleeps off
/// what it overdrew, so concurrent takers share the rate.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, burst: usize) -> Self {
        Self {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: Instant::now(),
        }
    }

    /// Takes `n` tokens; returns how long the caller must wait before sending.
    fn take(&mut self, n: usize) -> Duration {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst) - n as f64;
        self.last = now;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Dials the target, from a thread inside the target's namespace if any
/// (a socket stays in the namespace it was made in).
#[derive(Debug)]
enum Dialer {
    Here,
    Netns(Mutex<mpsc::Sender<(SocketAddr, mpsc::Sender<io::Result<TcpStream>>)>>),
}

impl Dialer {
    fn new(netns: Option<PathBuf>) -> io::Result<Self> {
        let Some(path) = netns else {
            return Ok(Dialer::Here);
        };
        type Request = (SocketAddr, mpsc::Sender<io::Result<TcpStream>>);
        let (tx, rx) = mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let entered = crate::netns::enter(&path);
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if !ok {
                return;
            }
            for (addr, reply) in rx {
                let _ = reply.send(TcpStream::connect_timeout(&addr, DIAL_TIMEOUT));
            }
        });
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("netns dialer thread died"))??;
        Ok(Dialer::Netns(Mutex::new(tx)))
    }

    fn dial(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        match self {
            Dialer::Here => TcpStream::connect_timeout(&addr, DIAL_TIMEOUT),
            Dialer::Netns(tx) => {
                let (reply_tx, reply_rx) = mpsc::channel();
                lock(tx)
                    .send((addr, reply_tx))
                    .map_err(|_| io::Error::other("netns dialer thread gone"))?;
                reply_rx
                    .recv()
                    .map_err(|_| io::Error::other("netns dialer thread gone"))?
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Link {
    /// Listens on a free port of 127.0.0.1 and forwards to `target`.
    pub fn start(target: SocketAddr, config: LinkConfig) -> io::Result<Link> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let chunk = config
            .rate
            .map_or(MAX_CHUNK, |r| (r as usize / 100).clamp(1024, MAX_CHUNK));
        let bucket = || {
            config
                .rate
                .map(|r| Mutex::new(Bucket::new(r.max(1), chunk)))
        };
        let shared = Arc::new(Shared {
            target,
            delay: config.delay,
            chunk,
            buckets: [bucket(), bucket()],
            delivered: [AtomicU64::new(0), AtomicU64::new(0)],
            accepted: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            dialer: Dialer::new(config.target_netns)?,
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || accept_loop(listener, shared))
        };
        Ok(Link {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every open connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.close_all();
    }

    /// Accepts connections again after a [`cut`](Self::cut).
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Bytes delivered to the target so far.
    pub fn bytes_to_target(&self) -> u64 {
        self.shared.delivered[0].load(Ordering::Relaxed)
    }

    /// Bytes delivered from the target to clients so far.
    pub fn bytes_from_target(&self) -> u64 {
        self.shared.delivered[1].load(Ordering::Relaxed)
    }

    /// Connections accepted and forwarded so far.
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }
}

impl Shared {
    fn close_all(&self) {
        for (_, pair) in lock(&self.conns).drain() {
            for s in pair {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.close_all();
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        if shared.cut.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let shared = shared.clone();
        std::thread::spawn(move || connect(client, shared));
    }
}

/// Dials the target for one accepted client and starts both directions.
fn connect(client: TcpStream, shared: Arc<Shared>) {
    let Ok(target) = shared.dialer.dial(shared.target) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = target.set_nodelay(true);
    let clones = (|| {
        Ok::<_, io::Error>((
            [client.try_clone()?, target.try_clone()?],
            client.try_clone()?,
            target.try_clone()?,
        ))
    })();
    let Ok((registered, client_writer, target_writer)) = clones else {
        return;
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    {
        let mut conns = lock(&shared.conns);
        // A cut between the accept and here must still win.
        if shared.cut.load(Ordering::SeqCst) || shared.stopped.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            let _ = target.shutdown(Shutdown::Both);
            return;
        }
        conns.insert(id, registered);
    }
    shared.accepted.fetch_add(1, Ordering::Relaxed);
    let up = {
        let shared = shared.clone();
        std::thread::spawn(move || pump(client, target_writer, 0, &shared))
    };
    pump(target, client_writer, 1, &shared);
    let _ = up.join();
    lock(&shared.conns).remove(&id);
}

/// One direction: a reader paced by the bucket stamps each chunk as it
/// leaves the bottleneck; a writer releases it `delay` later. The two run
/// apart, so chunks in flight overlap (a delay line, not stop-and-wait).
fn pump(mut from: TcpStream, mut to: TcpStream, dir: usize, shared: &Arc<Shared>) {
    let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let writer = {
        let shared = shared.clone();
        let to_reader = from.try_clone();
        std::thread::spawn(move || {
            for (stamp, chunk) in rx {
                let due = stamp + shared.delay;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if to.write_all(&chunk).is_err() {
                    // The far side is gone: stop the reader too.
                    let _ = to.shutdown(Shutdown::Both);
                    if let Ok(r) = &to_reader {
                        let _ = r.shutdown(Shutdown::Both);
                    }
                    return;
                }
                shared.delivered[dir].fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            // The reader saw end of stream: pass the half-close on.
            let _ = to.shutdown(Shutdown::Write);
        })
    };
    let mut buf = vec![0u8; shared.chunk];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(bucket) = &shared.buckets[dir] {
            let wait = lock(bucket).take(n);
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
        }
        if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP echo server on loopback: each connection gets its bytes back.
    fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut back = conn.try_clone().unwrap();
                    let _ = io::copy(&mut conn, &mut back);
                    let _ = back.shutdown(Shutdown::Write);
                });
            }
        });
        addr
    }

    /// A sink that counts what it reads and answers one byte at the end.
    fn sink() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let _ = io::copy(&mut conn, &mut io::sink());
                    let _ = conn.write_all(b"k");
                });
            }
        });
        addr
    }

    fn round_trip(stream: &mut TcpStream) -> Duration {
        let started = Instant::now();
        stream.write_all(b"ping").unwrap();
        let mut back = [0u8; 4];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ping");
        started.elapsed()
    }

    #[test]
    fn a_delay_adds_twice_itself_to_a_round_trip() {
        let link = Link::start(echo(), LinkConfig::new(Duration::from_millis(40), None)).unwrap();
        let mut s = TcpStream::connect(link.addr()).unwrap();
        s.set_nodelay(true).unwrap();
        for _ in 0..3 {
            let rtt = round_trip(&mut s);
            assert!(rtt >= Duration::from_millis(80), "{rtt:?}");
            assert!(rtt < Duration::from_millis(400), "{rtt:?}");
        }
    }

    #[test]
    fn a_cap_caps_each_direction() {
        let rate = 4_000_000u64;
        let link = Link::start(sink(), LinkConfig::new(Duration::ZERO, Some(rate))).unwrap();
        let mut s = TcpStream::connect(link.addr()).unwrap();
        let n = 4_000_000usize;
        let started = Instant::now();
        s.write_all(&vec![7u8; n]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut k = [0u8; 1];
        s.read_exact(&mut k).unwrap();
        let took = started.elapsed();
        let floor = Duration::from_secs_f64(n as f64 / rate as f64 * 0.95);
        assert!(took >= floor, "{n} bytes at {rate} B/s took {took:?}");
        assert!(
            took < floor * 3,
            "the cap is not far below itself: {took:?}"
        );
        assert_eq!(link.bytes_to_target(), n as u64);
    }

    #[test]
    fn a_delay_line_keeps_the_rate_over_a_long_round_trip() {
        // 8 MB at 8 MB/s over 100 ms each way: about 1 s plus one delay,
        // where stop-and-wait per 64 KiB chunk would take over 12 s.
        let rate = 8_000_000u64;
        let link = Link::start(
            echo(),
            LinkConfig::new(Duration::from_millis(100), Some(rate)),
        )
        .unwrap();
        let mut s = TcpStream::connect(link.addr()).unwrap();
        let n = 8_000_000usize;
        let mut reader = s.try_clone().unwrap();
        let started = Instant::now();
        let read = std::thread::spawn(move || {
            let mut got = 0usize;
            let mut buf = vec![0u8; 1 << 16];
            while got < n {
                match reader.read(&mut buf).unwrap() {
                    0 => break,
                    k => got += k,
                }
            }
            got
        });
        s.write_all(&vec![1u8; n]).unwrap();
        assert_eq!(read.join().unwrap(), n);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1150), "{took:?}");
        assert!(took < Duration::from_secs(4), "pipelined: {took:?}");
    }

    #[test]
    fn cut_drops_connections_and_refuses_new_ones_until_restored() {
        let link = Link::start(echo(), LinkConfig::default()).unwrap();
        let mut s = TcpStream::connect(link.addr()).unwrap();
        round_trip(&mut s);
        link.cut();
        let mut buf = [0u8; 4];
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"ping");
        assert!(
            matches!(s.read(&mut buf), Ok(0) | Err(_)),
            "the open connection is dropped"
        );
        let mut fresh = TcpStream::connect(link.addr()).unwrap();
        fresh
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = fresh.write_all(b"ping");
        assert!(
            matches!(fresh.read(&mut buf), Ok(0) | Err(_)),
            "a new connection is refused"
        );
        assert_eq!(link.open_connections(), 0);
        link.restore();
        let mut again = TcpStream::connect(link.addr()).unwrap();
        round_trip(&mut again);
        assert_eq!(link.connections(), 2);
    }
}
