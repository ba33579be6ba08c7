//! A load generator for atelier's non-generation endpoints and its SSE fan-out, run as its own
//! process against a running server on loopback (figures for the notes, not a test).
//!
//! ```text
//! cargo run --release --example loadgen -- http://127.0.0.1:8188 <api-key> requests <threads> <seconds> /healthz /api/usage ...
//! cargo run --release --example loadgen -- http://127.0.0.1:8188 <api-key> sse <clients>
//! cargo run --release --example loadgen -- http://127.0.0.1:8188 <api-key> hold <clients> <seconds>
//! ```
//! `requests`: keep-alive connections, one per thread, cycling through the paths; prints
//! requests/s and latency percentiles. `sse`: opens that many `/api/events` streams, submits
//! one job, and counts the streams that saw its events.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").trim_end_matches('/').to_string()
}

/// Sends one GET on `conn` and reads the whole response; returns the status.
fn get(conn: &mut BufReader<TcpStream>, host: &str, path: &str, key: &str) -> std::io::Result<u16> {
    write!(conn.get_mut(), "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\r\n")?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    let status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut len = 0usize;
    loop {
        line.clear();
        conn.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body)?;
    Ok(status)
}

fn requests(url: &str, key: &str, threads: usize, seconds: u64, paths: Vec<String>) {
    let host = host_port(url);
    let barrier = Arc::new(Barrier::new(threads));
    let errors = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (host, key, paths, barrier, errors) =
                (host.clone(), key.to_string(), paths.clone(), barrier.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut conn = BufReader::new(TcpStream::connect(&host).expect("connect"));
                conn.get_ref().set_nodelay(true).ok();
                let mut lat = Vec::new();
                barrier.wait();
                let end = Instant::now() + Duration::from_secs(seconds);
                let mut i = t;
                while Instant::now() < end {
                    let p = &paths[i % paths.len()];
                    i += 1;
                    let t0 = Instant::now();
                    match get(&mut conn, &host, p, &key) {
                        Ok(200) => lat.push(t0.elapsed()),
                        Ok(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            conn = BufReader::new(TcpStream::connect(&host).expect("reconnect"));
                        }
                    }
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<Duration> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    all.sort();
    let n = all.len();
    let pct = |p: f64| all[((n as f64 * p) as usize).min(n - 1)].as_secs_f64() * 1e3;
    println!(
        "{threads} connections, {seconds} s, paths {paths:?}: {n} ok, {} errors, {:.0} req/s, latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        errors.load(Ordering::Relaxed),
        n as f64 / seconds as f64,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
}

fn sse(url: &str, key: &str, clients: usize) {
    let host = host_port(url);
    let seen = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..clients {
        let (host, key, seen, opened) = (host.clone(), key.to_string(), seen.clone(), opened.clone());
        handles.push(std::thread::spawn(move || {
            let Ok(mut s) = TcpStream::connect(&host) else { return };
            s.set_read_timeout(Some(Duration::from_secs(60))).ok();
            if write!(s, "GET /api/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\r\n").is_err() {
                return;
            }
            let mut r = BufReader::new(s);
            let mut line = String::new();
            let mut counted_open = false;
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if line.starts_with("retry:") && !counted_open {
                    opened.fetch_add(1, Ordering::Relaxed);
                    counted_open = true;
                }
                if line.contains("\"type\":\"queued\"") || line.contains("\"type\":\"started\"") {
                    seen.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                line.clear();
            }
        }));
    }
    let t0 = Instant::now();
    while opened.load(Ordering::Relaxed) < clients && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("{} of {clients} streams open after {:.1} s", opened.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
    // One job: every stream should see its events.
    let mut s = TcpStream::connect(&host).unwrap();
    let body = r#"{"model":"demo-schnell","prompt":"fan-out","width":512,"height":512}"#;
    write!(
        s,
        "POST /api/jobs HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok();
    println!("submitted: {}", resp.lines().next().unwrap_or(""));
    let t1 = Instant::now();
    for h in handles {
        h.join().ok();
    }
    println!(
        "{} of {clients} streams received the job's event ({:.2} s after submitting)",
        seen.load(Ordering::Relaxed),
        t1.elapsed().as_secs_f64()
    );
}

/// Opens `clients` `/api/events` streams and keeps them for `seconds`; reports how many opened
/// and how many were still open at the end (run request load beside it).
fn hold(url: &str, key: &str, clients: usize, seconds: u64) {
    let host = host_port(url);
    let opened = Arc::new(AtomicUsize::new(0));
    let alive = Arc::new(AtomicUsize::new(0));
    let end = Instant::now() + Duration::from_secs(seconds);
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (host, key, opened, alive) = (host.clone(), key.to_string(), opened.clone(), alive.clone());
            std::thread::spawn(move || {
                let Ok(mut s) = TcpStream::connect(&host) else { return };
                if write!(s, "GET /api/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\r\n").is_err()
                {
                    return;
                }
                s.set_read_timeout(Some(Duration::from_millis(500))).ok();
                let mut r = BufReader::new(s);
                let mut line = String::new();
                let mut open = false;
                while Instant::now() < end {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) => return, // closed by the server
                        Ok(_) => {
                            if line.starts_with("retry:") && !open {
                                open = true;
                                opened.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {} // read timeout: still open
                    }
                }
                if open {
                    alive.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().ok();
    }
    println!(
        "{clients} streams: {} opened, {} still open after {seconds} s",
        opened.load(Ordering::Relaxed),
        alive.load(Ordering::Relaxed)
    );
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 3 {
        eprintln!("usage: loadgen <url> <api-key> requests <threads> <seconds> <path>... | sse <clients>");
        std::process::exit(2);
    }
    match a[2].as_str() {
        "requests" => requests(&a[0], &a[1], a[3].parse().unwrap(), a[4].parse().unwrap(), a[5..].to_vec()),
        "sse" => sse(&a[0], &a[1], a[3].parse().unwrap()),
        "hold" => hold(&a[0], &a[1], a[3].parse().unwrap(), a[4].parse().unwrap()),
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
}
