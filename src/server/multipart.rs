//! A streaming `multipart/form-data` reader (RFC 7578): parts one after another, each body in
//! chunks as they arrive, so an upload goes to disk without sitting in memory. Small on purpose:
//! form-data only (no nested multipart, no `filename*`), part headers up to 16 KiB.

use actix_web::web::Bytes;
use futures_util::{Stream, StreamExt};

use crate::server::error::ApiError;

const MAX_HEADERS: usize = 16 * 1024;

/// The headers of one part.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PartHead {
    /// The form field name.
    pub name: String,
    /// The client's file name, for a file.
    pub filename: Option<String>,
    /// The part's Content-Type, if sent.
    pub content_type: Option<String>,
}

#[derive(PartialEq)]
enum State {
    /// Before the first delimiter.
    Preamble,
    /// Right after a delimiter: a part's headers or the closing `--` follow.
    Delimiter,
    /// Inside a part's body.
    Body,
    Done,
}

pub struct Multipart<S> {
    stream: S,
    /// `\r\n--boundary`: what ends every body (the first one is found by starting the buffer
    /// with `\r\n`).
    delimiter: Vec<u8>,
    buf: Vec<u8>,
    state: State,
    ended: bool,
}

/// The boundary of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Result<String, ApiError> {
    let mut parts = content_type.split(';');
    let kind = parts.next().unwrap_or("").trim();
    if !kind.eq_ignore_ascii_case("multipart/form-data") {
        return Err(ApiError::new(
            actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "send the files as multipart/form-data, not {:?}",
                if kind.is_empty() { "no content type" } else { kind }
            ),
        ));
    }
    for p in parts {
        if let Some((k, v)) = p.split_once('=')
            && k.trim().eq_ignore_ascii_case("boundary")
        {
            let b = v.trim().trim_matches('"');
            if !b.is_empty() && b.len() <= 70 {
                return Ok(b.to_string());
            }
        }
    }
    Err(ApiError::bad_request("multipart/form-data without a valid boundary"))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if hay.len() < needle.len() {
        return None;
    }
    (0..=hay.len() - needle.len()).find(|&i| hay[i] == needle[0] && hay[i..].starts_with(needle))
}

/// A Content-Disposition parameter (`name="x"`), quoted or not.
fn param(disposition: &str, key: &str) -> Option<String> {
    let mut rest = disposition;
    while let Some(i) = rest.find(';') {
        rest = rest[i + 1..].trim_start();
        let Some((k, v)) = rest.split_once('=') else { break };
        let v = v.trim_start();
        let (value, after) = if let Some(q) = v.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            out.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => out.push(c),
                }
            }
            (out, &q[end.min(q.len())..])
        } else {
            let end = v.find(';').unwrap_or(v.len());
            (v[..end].trim().to_string(), &v[end..])
        };
        if k.trim().eq_ignore_ascii_case(key) {
            return Some(value);
        }
        rest = after;
    }
    None
}

fn parse_head(raw: &[u8]) -> Result<PartHead, ApiError> {
    let text =
        std::str::from_utf8(raw).map_err(|_| ApiError::bad_request("a multipart part's headers are not UTF-8"))?;
    let mut head = PartHead::default();
    let mut disposition = None;
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let Some((k, v)) = line.split_once(':') else {
            return Err(ApiError::bad_request("a malformed multipart part header"));
        };
        if k.trim().eq_ignore_ascii_case("content-disposition") {
            disposition = Some(v.trim().to_string());
        } else if k.trim().eq_ignore_ascii_case("content-type") {
            head.content_type = Some(v.trim().to_string());
        }
    }
    let d = disposition.ok_or_else(|| ApiError::bad_request("a multipart part without Content-Disposition"))?;
    head.name = param(&d, "name").ok_or_else(|| ApiError::bad_request("a multipart part without a name"))?;
    head.filename = param(&d, "filename");
    Ok(head)
}

impl<S, E> Multipart<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    pub fn new(stream: S, boundary: &str) -> Multipart<S> {
        Multipart {
            stream,
            delimiter: [b"\r\n--", boundary.as_bytes()].concat(),
            buf: b"\r\n".to_vec(),
            state: State::Preamble,
            ended: false,
        }
    }

    /// Reads more of the body into the buffer; false at its end.
    async fn fill(&mut self) -> Result<bool, ApiError> {
        if self.ended {
            return Ok(false);
        }
        match self.stream.next().await {
            Some(Ok(b)) => {
                self.buf.extend_from_slice(&b);
                Ok(true)
            }
            Some(Err(e)) => Err(ApiError::bad_request(format!("reading the upload: {e}"))),
            None => {
                self.ended = true;
                Ok(false)
            }
        }
    }

    fn truncated() -> ApiError {
        ApiError::bad_request("the upload ended before its multipart body did")
    }

    /// The next part's headers, skipping what is left of the current one; `None` after the last.
    pub async fn next_part(&mut self) -> Result<Option<PartHead>, ApiError> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Body => while self.chunk().await?.is_some() {},
                State::Preamble => match find(&self.buf, &self.delimiter) {
                    Some(i) => {
                        self.buf.drain(..i + self.delimiter.len());
                        self.state = State::Delimiter;
                    }
                    None => {
                        // Keep a tail that may be the start of the delimiter.
                        let keep = self.delimiter.len().min(self.buf.len());
                        self.buf.drain(..self.buf.len() - keep);
                        if !self.fill().await? {
                            return Err(Self::truncated());
                        }
                    }
                },
                State::Delimiter => {
                    if self.buf.starts_with(b"--") {
                        self.state = State::Done;
                        return Ok(None);
                    }
                    if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                        // After the delimiter: optional spaces, CRLF, the headers, an empty line.
                        let first = find(&self.buf, b"\r\n").unwrap_or(0);
                        let head = parse_head(&self.buf[first..end])?;
                        self.buf.drain(..end + 4);
                        self.state = State::Body;
                        return Ok(Some(head));
                    }
                    if self.buf.len() > MAX_HEADERS {
                        return Err(ApiError::bad_request("a multipart part's headers are too long"));
                    }
                    if !self.fill().await? {
                        return Err(Self::truncated());
                    }
                }
            }
        }
    }

    /// The next chunk of the current part's body; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>, ApiError> {
        if self.state != State::Body {
            return Ok(None);
        }
        loop {
            if let Some(i) = find(&self.buf, &self.delimiter) {
                let out: Vec<u8> = self.buf.drain(..i).collect();
                self.buf.drain(..self.delimiter.len());
                self.state = State::Delimiter;
                return Ok(if out.is_empty() { None } else { Some(out) });
            }
            // Everything but a tail that may be the start of the delimiter is body; handed out
            // in pieces of 64 KiB or more (or as the network delivered them, when larger).
            let safe = self.buf.len().saturating_sub(self.delimiter.len() - 1);
            if safe >= 64 * 1024 {
                return Ok(Some(self.buf.drain(..safe).collect()));
            }
            if !self.fill().await? {
                return Err(Self::truncated());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn read_all(body: &[u8], chunk: usize) -> Result<Vec<(PartHead, Vec<u8>)>, String> {
        let chunks: Vec<Result<Bytes, String>> = body.chunks(chunk).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let mut mp = Multipart::new(futures_util::stream::iter(chunks), "XyZ");
        async move {
            let mut out = Vec::new();
            while let Some(head) = mp.next_part().await.map_err(|e| e.message)? {
                let mut data = Vec::new();
                while let Some(c) = mp.chunk().await.map_err(|e| e.message)? {
                    data.extend_from_slice(&c);
                }
                out.push((head, data));
            }
            Ok(out)
        }
        .now_or_never()
        .unwrap()
    }

    const BODY: &[u8] = b"preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a \\\"b\\\".png\"\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n--Xy not yet\r\n--XyZ\r\nContent-Disposition: form-data; name=caption:a.png\r\n\r\nhello\r\n--XyZ--\r\n";

    #[test]
    fn parts_split_anywhere_read_the_same() {
        for chunk in [1, 2, 3, 7, 16, 1000] {
            let parts = read_all(BODY, chunk).unwrap();
            assert_eq!(parts.len(), 2, "chunk {chunk}");
            assert_eq!(parts[0].0.name, "files");
            assert_eq!(parts[0].0.filename.as_deref(), Some("a \"b\".png"));
            assert_eq!(parts[0].0.content_type.as_deref(), Some("image/png"));
            assert_eq!(parts[0].1, b"\x89PNG\r\n--Xy not yet", "chunk {chunk}");
            assert_eq!((parts[1].0.name.as_str(), parts[1].0.filename.as_deref()), ("caption:a.png", None));
            assert_eq!(parts[1].1, b"hello");
        }
    }

    #[test]
    fn a_cut_body_is_an_error_and_boundaries_are_read() {
        assert!(read_all(&BODY[..BODY.len() - 30], 5).is_err());
        assert!(read_all(b"", 5).is_err());
        assert_eq!(boundary("multipart/form-data; boundary=\"a b\"").unwrap(), "a b");
        assert!(boundary("image/png").is_err());
        assert!(boundary("multipart/form-data").is_err());
    }
}
