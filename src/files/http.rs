//! Static boot files (kernels, initrds, iPXE binaries) over HTTP: HEAD, single Range requests, validators
//! (ETag, Last-Modified, If-None-Match, If-Modified-Since, If-Range). Whole files up to a quarter of the
//! cache budget come from the [`FileCache`]; larger files are streamed from disk in 1 MiB reads on the
//! blocking pool. Responses are built with the HTTP room's body type and helpers.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Response, StatusCode};
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use super::FileCache;
use crate::http::{empty, text, HttpBody};

/// Read size for streamed files: large enough that per-chunk overhead vanishes next to the copy.
const CHUNK: usize = 1 << 20;

/// Serves `path` (already confined) for a GET or HEAD with the request's headers.
pub async fn serve(
    cache: &FileCache,
    path: PathBuf,
    method: &Method,
    req: &HeaderMap,
) -> Response<HttpBody> {
    let meta = match tokio::fs::metadata(&path).await {
        Ok(m) if m.is_file() => m,
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    let len = meta.len();
    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let stamp = mtime
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let etag = format!("\"{stamp:x}-{len:x}\"");
    let last_modified = httpdate::fmt_http_date(mtime);

    if not_modified(req, &etag, mtime) {
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r.headers_mut().insert(header::ETAG, hv(&etag));
        r.headers_mut()
            .insert(header::LAST_MODIFIED, hv(&last_modified));
        return r;
    }

    let range = match req.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) if if_range_holds(req, &etag, &last_modified) => match parse_range(r, len) {
            RangeReq::Whole => None,
            RangeReq::Part(a, b) => Some((a, b)),
            RangeReq::Unsatisfiable => {
                let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n");
                r.headers_mut()
                    .insert(header::CONTENT_RANGE, hv(&format!("bytes */{len}")));
                return r;
            }
        },
        _ => None,
    };
    let (start, end) = range.unwrap_or((0, len.saturating_sub(1)));
    let body_len = if len == 0 { 0 } else { end - start + 1 };

    let body = if method == Method::HEAD || body_len == 0 {
        empty()
    } else if len <= cache.budget / 4 {
        let bytes = match cache.get(&path, len, mtime) {
            Some(b) => b,
            None => {
                let p = path.clone();
                match tokio::task::spawn_blocking(move || std::fs::read(p)).await {
                    Ok(Ok(data)) if data.len() as u64 == len => {
                        let b = Bytes::from(data);
                        cache.insert(path.clone(), b.clone(), mtime);
                        b
                    }
                    // The file changed under us: serve what is there now, uncached.
                    Ok(Ok(data)) => {
                        return text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &format!("file changed while read ({} bytes)\n", data.len()),
                        )
                    }
                    _ => return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot read file\n"),
                }
            }
        };
        http_body_util::Full::new(bytes.slice(start as usize..(end + 1) as usize))
            .map_err(|n| match n {})
            .boxed()
    } else {
        match std::fs::File::open(&path) {
            Ok(f) => FileStream {
                file: Arc::new(f),
                offset: start,
                remaining: body_len,
                pending: None,
            }
            .boxed(),
            Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot open file\n"),
        }
    };

    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, hv(&body_len.to_string()));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, hv(&etag));
    h.insert(header::LAST_MODIFIED, hv(&last_modified));
    if range.is_some() {
        *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        r.headers_mut().insert(
            header::CONTENT_RANGE,
            hv(&format!("bytes {start}-{end}/{len}")),
        );
    }
    r
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2).
fn not_modified(req: &HeaderMap, etag: &str, mtime: SystemTime) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        return inm.split(',').any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == etag
        });
    }
    if let Some(ims) = req
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| httpdate::parse_http_date(s).ok())
    {
        // HTTP dates have second resolution.
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        return secs(mtime) <= secs(ims);
    }
    false
}

fn if_range_holds(req: &HeaderMap, etag: &str, last_modified: &str) -> bool {
    match req.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(v) => v == etag || v == last_modified,
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum RangeReq {
    Whole,
    Part(u64, u64),
    Unsatisfiable,
}

/// Parses a single `bytes=` range against a length. Multiple ranges are answered with the whole file
/// (a server may ignore Range); a syntactically bad header is ignored likewise.
pub fn parse_range(h: &str, len: u64) -> RangeReq {
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeReq::Whole;
    };
    if spec.contains(',') {
        return RangeReq::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeReq::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    match (a.is_empty(), b.is_empty()) {
        (true, true) => RangeReq::Whole,
        (true, false) => match b.parse::<u64>() {
            Ok(0) => RangeReq::Unsatisfiable,
            Ok(_) if len == 0 => RangeReq::Unsatisfiable,
            Ok(n) => RangeReq::Part(len.saturating_sub(n), len - 1),
            Err(_) => RangeReq::Whole,
        },
        (false, _) => {
            let Ok(start) = a.parse::<u64>() else {
                return RangeReq::Whole;
            };
            let end = if b.is_empty() {
                len.saturating_sub(1)
            } else {
                match b.parse::<u64>() {
                    Ok(e) if e >= start => e.min(len.saturating_sub(1)),
                    _ => return RangeReq::Whole,
                }
            };
            if start >= len {
                RangeReq::Unsatisfiable
            } else {
                RangeReq::Part(start, end)
            }
        }
    }
}

type Pending = tokio::task::JoinHandle<io::Result<Bytes>>;

/// A file region streamed in large reads on the blocking pool.
struct FileStream {
    file: Arc<std::fs::File>,
    offset: u64,
    remaining: u64,
    pending: Option<Pending>,
}

impl Body for FileStream {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.remaining == 0 && self.pending.is_none() {
            return Poll::Ready(None);
        }
        if self.pending.is_none() {
            let (file, offset, n) = (
                self.file.clone(),
                self.offset,
                self.remaining.min(CHUNK as u64) as usize,
            );
            self.pending = Some(tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n];
                let mut got = 0;
                while got < n {
                    match file.read_at(&mut buf[got..], offset + got as u64)? {
                        0 => {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "file shrank while served",
                            ))
                        }
                        k => got += k,
                    }
                }
                Ok(Bytes::from(buf))
            }));
        }
        let res = match Pin::new(self.pending.as_mut().expect("set above")).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        self.pending = None;
        match res {
            Ok(Ok(b)) => {
                self.offset += b.len() as u64;
                self.remaining -= b.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Ok(Err(e)) => Poll::Ready(Some(Err(e))),
            Err(e) => Poll::Ready(Some(Err(io::Error::other(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0 && self.pending.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeReq::Part(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), RangeReq::Part(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), RangeReq::Part(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), RangeReq::Part(0, 99));
        assert_eq!(parse_range("bytes=50-1000", 100), RangeReq::Part(50, 99));
        assert_eq!(parse_range("bytes=100-", 100), RangeReq::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), RangeReq::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeReq::Whole);
        assert_eq!(parse_range("bytes=9-3", 100), RangeReq::Whole);
        assert_eq!(parse_range("items=0-1", 100), RangeReq::Whole);
        assert_eq!(parse_range("bytes=x-1", 100), RangeReq::Whole);
    }
}
