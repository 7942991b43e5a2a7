//! A video's source: the URL the upstream's answer names, fetched as
//! hostile input.
//!
//! The URL comes from a poll answer, so it could name anything the worker
//! can reach. Unless `storage.allow_private_sources`, it is fetched only
//! over `https` and only from public addresses: checked on the URL itself
//! (an address literal), after DNS resolution (a resolver that drops every
//! non-public address, so a name cannot point inside), and again on every
//! redirect (at most [`MAX_REDIRECTS`]). Connecting and the whole copy have
//! timeouts; the size cap is enforced while the body streams in, never
//! trusted from `Content-Length`; the first bytes must look like a video.
//! The plain rules ([`is_public`], [`url_allowed`], [`looks_like_video`],
//! [`status_failure`]) are functions with table tests.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use reqwest::{
    dns::{Addrs, Name, Resolve, Resolving},
    header, redirect, StatusCode,
};

use super::CopyError;

/// Redirects followed at most.
pub const MAX_REDIRECTS: usize = 3;

/// Bytes of a video's beginning kept to check that it is one.
pub const SNIFF_BYTES: usize = 16;

/// Why a source URL is never fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not `https` (without `allow_private_sources`), or not http(s) at all.
    #[error("the video URL's scheme is not https")]
    Scheme,
    /// The host is, or resolves only to, a non-public address.
    #[error("the video URL's host is not a public address")]
    PrivateAddress,
    /// Not a URL with a host.
    #[error("the video URL is not a URL with a host")]
    Malformed,
    /// More than [`MAX_REDIRECTS`] redirects.
    #[error("the video URL redirects more than {MAX_REDIRECTS} times")]
    TooManyRedirects,
}

/// Whether `ip` is a public unicast address: not loopback, private,
/// link-local, shared (CGNAT), unspecified, multicast, broadcast,
/// documentation, benchmarking or reserved, nor an IPv6 form of one.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // unique local fc00::/7, link-local fe80::/10
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                // documentation 2001:db8::/32
                || (first == 0x2001 && v6.segments()[1] == 0x0db8)
                // IPv4-compatible and NAT64 forms of any address
                || v6.segments()[..6].iter().all(|s| *s == 0)
                || (first == 0x0064 && v6.segments()[1] == 0xff9b))
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // shared address space 100.64.0.0/10
        || (a == 100 && (64..128).contains(&b))
        // IETF protocol assignments 192.0.0.0/24
        || (a == 192 && b == 0 && c == 0)
        // benchmarking 198.18.0.0/15
        || (a == 198 && (b == 18 || b == 19))
        // reserved 240.0.0.0/4
        || a >= 240)
}

/// Whether a URL may be fetched: `https` with a host, whose address, when
/// it is one, is public; anything http(s) with `allow_private`.
pub fn url_allowed(url: &url::Url, allow_private: bool) -> Result<(), Refused> {
    match url.scheme() {
        "https" => {}
        "http" if allow_private => {}
        _ => return Err(Refused::Scheme),
    }
    let host = url.host().ok_or(Refused::Malformed)?;
    if allow_private {
        return Ok(());
    }
    let literal = match host {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    };
    match literal {
        Some(ip) if !is_public(ip) => Err(Refused::PrivateAddress),
        _ => Ok(()),
    }
}

/// Whether the beginning of a body is a video: ISO base media (MP4, MOV,
/// 3GP: an `ftyp` box first), Matroska/WebM (EBML), AVI (RIFF) or an MPEG
/// program stream. An HTML, XML or JSON error page is not.
pub fn looks_like_video(head: &[u8]) -> bool {
    if head.len() >= 8 && &head[4..8] == b"ftyp" {
        return true;
    }
    head.starts_with(&[0x1a, 0x45, 0xdf, 0xa3])
        || (head.len() >= 12 && head.starts_with(b"RIFF") && &head[8..12] == b"AVI ")
        || head.starts_with(&[0x00, 0x00, 0x01, 0xba])
}

/// What a source's answer other than 200 means for the copy.
pub fn status_failure(status: StatusCode) -> CopyError {
    match status.as_u16() {
        // An expired or revoked signed URL, or the object is gone: a fresh
        // poll may give a fresh URL.
        401 | 403 | 404 | 410 => CopyError::SourceGone(format!("the video URL answered {status}")),
        408 | 425 | 429 | 500..=599 => {
            CopyError::Transient(format!("the video URL answered {status}"))
        }
        _ => CopyError::Rejected(format!("the video URL answered {status}")),
    }
}

/// The resolver of a source: the system's, keeping only public addresses
/// unless private ones are allowed.
struct PublicOnly {
    allow_private: bool,
}

/// A name that resolved only to addresses the worker must not reach.
#[derive(Debug, thiserror::Error)]
#[error("the video URL's host resolves to no public address")]
struct NoPublicAddress;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let kept: Vec<SocketAddr> = found
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if kept.is_empty() {
                return Err(Box::new(NoPublicAddress) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

/// Fetches video sources.
#[derive(Clone)]
pub struct Sources {
    client: reqwest::Client,
    allow_private: bool,
}

impl Sources {
    /// A client with the rules above.
    pub fn new(connect_timeout: Duration, allow_private: bool) -> Result<Self, reqwest::Error> {
        let policy = redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(Refused::TooManyRedirects);
            }
            match url_allowed(attempt.url(), allow_private) {
                Ok(()) => attempt.follow(),
                Err(refused) => attempt.error(refused),
            }
        });
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .read_timeout(connect_timeout.max(Duration::from_secs(30)))
            .redirect(policy)
            .dns_resolver(Arc::new(PublicOnly { allow_private }))
            .user_agent(concat!("vidu-worker/", env!("CARGO_PKG_VERSION")))
            // No compression: the size cap counts the bytes received.
            .no_gzip()
            .no_brotli()
            .no_deflate()
            .build()?;
        Ok(Self {
            client,
            allow_private,
        })
    }

    /// Opens a source: a 200 whose announced length (if any) is within
    /// `max_bytes`, or why not.
    pub async fn open(&self, url: &str, max_bytes: u64) -> Result<reqwest::Response, CopyError> {
        let parsed = url::Url::parse(url)
            .map_err(|_| CopyError::Rejected(Refused::Malformed.to_string()))?;
        url_allowed(&parsed, self.allow_private)
            .map_err(|refused| CopyError::Rejected(refused.to_string()))?;
        let response = self
            .client
            .get(parsed)
            .send()
            .await
            .map_err(request_failure)?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(status_failure(status));
        }
        if let Some(len) = response.content_length() {
            if len > max_bytes {
                return Err(CopyError::TooLarge { max_bytes });
            }
        }
        if let Some(kind) = response.headers().get(header::CONTENT_TYPE) {
            let kind = kind.to_str().unwrap_or("").to_ascii_lowercase();
            if kind.starts_with("text/") || kind.contains("json") || kind.contains("xml") {
                return Err(CopyError::NotAVideo);
            }
        }
        Ok(response)
    }
}

/// What a failed request to a source means: a refused URL or address is
/// the request's end; anything else (DNS, connect, reset, timeout) is
/// worth trying again.
pub fn request_failure(e: reqwest::Error) -> CopyError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if let Some(refused) = c.downcast_ref::<Refused>() {
            return CopyError::Rejected(refused.to_string());
        }
        if c.downcast_ref::<NoPublicAddress>().is_some() {
            return CopyError::Rejected(Refused::PrivateAddress.to_string());
        }
        cause = c.source();
    }
    // Never the URL: it is signed, and the upstream's.
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "broke off"
    } else {
        "failed"
    };
    CopyError::Transient(format!("fetching the video {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for (ip, public) in [
            ("8.8.8.8", true),
            ("1.1.1.1", true),
            ("2606:4700::1111", true),
            ("127.0.0.1", false),
            ("10.1.2.3", false),
            ("172.16.0.1", false),
            ("192.168.1.1", false),
            ("169.254.169.254", false),
            ("100.64.0.1", false),
            ("0.0.0.0", false),
            ("255.255.255.255", false),
            ("224.0.0.1", false),
            ("198.18.0.1", false),
            ("192.0.0.8", false),
            ("192.0.2.1", false),
            ("240.0.0.1", false),
            ("::1", false),
            ("::", false),
            ("::ffff:127.0.0.1", false),
            ("::ffff:8.8.8.8", true),
            ("::127.0.0.1", false),
            ("fc00::1", false),
            ("fd12::1", false),
            ("fe80::1", false),
            ("ff02::1", false),
            ("2001:db8::1", false),
            ("64:ff9b::a00:1", false),
        ] {
            let addr: IpAddr = ip.parse().expect("address");
            assert_eq!(is_public(addr), public, "{ip}");
        }
    }

    #[test]
    fn urls_are_https_to_public_hosts_unless_private_sources_are_allowed() {
        let u = |s: &str| url::Url::parse(s).expect("url");
        for (url, strict, relaxed) in [
            ("https://cdn.example.com/v.mp4?sig=1", Ok(()), Ok(())),
            ("http://cdn.example.com/v.mp4", Err(Refused::Scheme), Ok(())),
            (
                "ftp://cdn.example.com/v.mp4",
                Err(Refused::Scheme),
                Err(Refused::Scheme),
            ),
            (
                "file:///etc/passwd",
                Err(Refused::Scheme),
                Err(Refused::Scheme),
            ),
            (
                "https://127.0.0.1/v.mp4",
                Err(Refused::PrivateAddress),
                Ok(()),
            ),
            ("https://[::1]/v.mp4", Err(Refused::PrivateAddress), Ok(())),
            (
                "https://169.254.169.254/latest",
                Err(Refused::PrivateAddress),
                Ok(()),
            ),
            ("https://8.8.8.8/v.mp4", Ok(()), Ok(())),
            ("http://127.0.0.1:9/v.mp4", Err(Refused::Scheme), Ok(())),
        ] {
            assert_eq!(url_allowed(&u(url), false), strict, "{url}");
            assert_eq!(
                url_allowed(&u(url), true),
                relaxed,
                "{url} (private allowed)"
            );
        }
    }

    #[test]
    fn a_video_is_told_from_an_error_page() {
        let mut mp4 = vec![0, 0, 0, 0x20];
        mp4.extend_from_slice(b"ftypisom");
        for (head, video) in [
            (mp4.as_slice(), true),
            (&[0x1a, 0x45, 0xdf, 0xa3, 0x01][..], true),
            (b"RIFF\x00\x00\x00\x00AVI LIST", true),
            (b"GIF89a", false),
            (&[0x00, 0x00, 0x01, 0xba][..], true),
            (b"<html>expired</html>", false),
            (b"{\"error\":\"AccessDenied\"}", false),
            (b"<?xml version=\"1.0\"?><Error>", false),
            (b"", false),
            (b"ftyp", false),
        ] {
            assert_eq!(looks_like_video(head), video, "{head:?}");
        }
    }

    #[test]
    fn a_source_status_says_whether_to_try_again() {
        for (status, expected) in [
            (403, "gone"),
            (404, "gone"),
            (410, "gone"),
            (401, "gone"),
            (429, "transient"),
            (500, "transient"),
            (503, "transient"),
            (408, "transient"),
            (400, "rejected"),
            (416, "rejected"),
            (301, "rejected"),
        ] {
            let kind = match status_failure(StatusCode::from_u16(status).expect("status")) {
                CopyError::SourceGone(_) => "gone",
                CopyError::Transient(_) => "transient",
                CopyError::Rejected(_) => "rejected",
                other => panic!("{other:?}"),
            };
            assert_eq!(kind, expected, "{status}");
        }
    }
}
