//! Where a homeserver is: its client-server API (for delayed events) and its federation API (for
//! OpenID userinfo), from operator overrides or Matrix discovery, and the SSRF guard that keeps
//! discovered addresses out of internal networks.
//!
//! Federation discovery follows the spec's steps without SRV records: an explicit port or an IP
//! literal is used as is, else `/.well-known/matrix/server`, else port 8448. Client-server
//! discovery reads `/.well-known/matrix/client`, else uses `https://<server name>`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::Url;

use super::{Clients, Overrides};

/// Answers kept this long; a bounded number of server names.
const CACHE_TTL: Duration = Duration::from_secs(3600);
const CACHE_MAX: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("invalid server name {0:?}")]
    InvalidServerName(String),
    #[error("homeserver {server} resolves to a non-public address ({addr}); refused")]
    Forbidden { server: String, addr: String },
    #[error("discovery for {server} failed: {reason}")]
    Failed { server: String, reason: String },
}

/// A base URL and whether it came from the operator (trusted) or from discovery (guarded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub base: Url,
    pub trusted: bool,
}

impl Endpoint {
    /// The client to reach this endpoint with.
    pub fn client<'a>(&self, clients: &'a Clients) -> &'a reqwest::Client {
        if self.trusted { &clients.trusted } else { &clients.guarded }
    }
}

pub struct Discovery {
    clients: Clients,
    cs_overrides: Overrides,
    federation_overrides: Overrides,
    allow_private: bool,
    cs_cache: Mutex<HashMap<String, (Instant, Url)>>,
}

impl Discovery {
    pub fn new(
        clients: Clients,
        cs_overrides: Overrides,
        federation_overrides: Overrides,
        allow_private: bool,
    ) -> Self {
        Discovery { clients, cs_overrides, federation_overrides, allow_private, cs_cache: Mutex::default() }
    }

    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    /// The client-server endpoint of a stored delegation: the operator's override if there is
    /// one now, else the URL discovered when it was delegated (re-checked against the SSRF guard).
    pub fn cs_endpoint_for_stored(&self, server: &str, stored: &str) -> Result<Endpoint, DiscoveryError> {
        if let Some(url) = self.cs_overrides.get(server) {
            return Ok(Endpoint { base: url.clone(), trusted: true });
        }
        let base = Url::parse(stored).map_err(|e| DiscoveryError::Failed {
            server: server.into(),
            reason: format!("stored URL {stored:?}: {e}"),
        })?;
        self.check_literal(server, &base)?;
        Ok(Endpoint { base, trusted: false })
    }

    /// The client-server API base URL of `server`.
    pub async fn client_server_api(&self, server: &str) -> Result<Endpoint, DiscoveryError> {
        validate_server_name(server)?;
        if let Some(url) = self.cs_overrides.get(server) {
            return Ok(Endpoint { base: url.clone(), trusted: true });
        }
        if let Some((at, url)) = self.cs_cache.lock().unwrap().get(server).cloned() {
            if at.elapsed() < CACHE_TTL {
                return Ok(Endpoint { base: url, trusted: false });
            }
        }
        let fallback = https_url(server)?;
        let well_known = fallback.join("/.well-known/matrix/client").expect("static path");
        self.check_literal(server, &well_known)?;
        let base = match self.get_json(server, well_known).await? {
            Some(v) => match v.pointer("/m.homeserver/base_url").and_then(|b| b.as_str()) {
                Some(b) => Url::parse(b.trim_end_matches('/')).map_err(|e| DiscoveryError::Failed {
                    server: server.into(),
                    reason: format!("well-known base_url {b:?}: {e}"),
                })?,
                None => fallback,
            },
            None => fallback,
        };
        if !matches!(base.scheme(), "https" | "http") || base.host_str().is_none() {
            return Err(DiscoveryError::Failed { server: server.into(), reason: format!("bad base_url {base}") });
        }
        self.check_literal(server, &base)?;
        let mut cache = self.cs_cache.lock().unwrap();
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(server.to_owned(), (Instant::now(), base.clone()));
        Ok(Endpoint { base, trusted: false })
    }

    /// The federation API base URL of `server`.
    pub async fn federation_api(&self, server: &str) -> Result<Endpoint, DiscoveryError> {
        validate_server_name(server)?;
        if let Some(url) = self.federation_overrides.get(server) {
            return Ok(Endpoint { base: url.clone(), trusted: true });
        }
        let plain = https_url(server)?;
        let has_port = plain.port().is_some();
        let is_ip = matches!(plain.host(), Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)));
        let base = if has_port {
            plain
        } else if is_ip {
            with_port(plain, 8448)
        } else {
            let well_known = plain.join("/.well-known/matrix/server").expect("static path");
            let delegated = self
                .get_json(server, well_known)
                .await
                .ok()
                .flatten()
                .and_then(|v| v.get("m.server").and_then(|s| s.as_str()).map(str::to_owned));
            match delegated.map(|d| https_url(&d)) {
                Some(Ok(u)) if u.port().is_some() => u,
                Some(Ok(u)) => with_port(u, 8448),
                _ => with_port(plain, 8448),
            }
        };
        self.check_literal(server, &base)?;
        Ok(Endpoint { base, trusted: false })
    }

    /// GET a JSON document through the guarded client; `None` on 404 or a non-JSON answer.
    async fn get_json(&self, server: &str, url: Url) -> Result<Option<serde_json::Value>, DiscoveryError> {
        let failed = |reason: String| DiscoveryError::Failed { server: server.into(), reason };
        let resp = self.clients.guarded.get(url).send().await.map_err(|e| failed(super::describe(e)))?;
        if !resp.status().is_success() {
            return Ok(None);
        }
        Ok(super::read_json(resp).await.ok())
    }

    /// Refuses IP-literal URLs in non-public ranges (names are checked by [`GuardedResolver`]).
    fn check_literal(&self, server: &str, url: &Url) -> Result<(), DiscoveryError> {
        if self.allow_private {
            return Ok(());
        }
        let ip: Option<IpAddr> = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(ip.into()),
            Some(url::Host::Ipv6(ip)) => Some(ip.into()),
            _ => None,
        };
        match ip {
            Some(ip) if !is_public(ip) => {
                Err(DiscoveryError::Forbidden { server: server.into(), addr: ip.to_string() })
            }
            _ => Ok(()),
        }
    }
}

/// A Matrix server name: hostname, IPv4 or `[IPv6]`, optional port.
pub fn validate_server_name(server: &str) -> Result<(), DiscoveryError> {
    ruma::ServerName::parse(server).map_err(|_| DiscoveryError::InvalidServerName(server.into()))?;
    Ok(())
}

fn https_url(host_port: &str) -> Result<Url, DiscoveryError> {
    Url::parse(&format!("https://{host_port}"))
        .ok()
        .filter(|u| u.path() == "/" && u.host_str().is_some())
        .ok_or_else(|| DiscoveryError::InvalidServerName(host_port.into()))
}

fn with_port(mut url: Url, port: u16) -> Url {
    let _ = url.set_port(Some(port));
    url
}

/// Whether `ip` is a globally routable unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xC0) == 64) // 100.64/10 shared address space
                || (o[0] == 198 && (o[1] & 0xFE) == 18) // 198.18/15 benchmarking
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| IpAddr::V4(std::net::Ipv4Addr::from(((hi as u32) << 16) | lo as u32));
            // Forms that reach an IPv4 address through a translator or tunnel are as public as
            // the address they carry: NAT64's well-known prefix 64:ff9b::/96 (RFC 6052), 6to4
            // 2002::/16 (RFC 3056), and the deprecated IPv4-compatible ::a.b.c.d.
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public(embedded(s[6], s[7]));
            }
            if s[0] == 0x2002 {
                return is_public(embedded(s[1], s[2]));
            }
            if s[..6] == [0, 0, 0, 0, 0, 0] && !v6.is_loopback() && !v6.is_unspecified() {
                return is_public(embedded(s[6], s[7]));
            }
            // Teredo (2001::/32, RFC 4380) tunnels to an address it hides, and NAT64's local-use
            // prefix 64:ff9b:1::/48 (RFC 8215) translates into the operator's own networks: a
            // homeserver has no business on either.
            if (s[0] == 0x2001 && s[1] == 0) || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) {
                return false;
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xFE00) == 0xFC00 // unique local
                || (s[0] & 0xFFC0) == 0xFE80 // link local
                || (s[0] == 0x2001 && s[1] == 0x0DB8)) // documentation
        }
    }
}

/// A DNS resolver that only yields public addresses, so a discovered name cannot point us at
/// internal services (checked at connect time, so DNS rebinding does not get around it).
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = addrs.iter().copied().filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(format!("{host} resolves to no public address; refused").into());
            }
            Ok(Box::new(public.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discovery() -> Discovery {
        let clients = Clients::new(Duration::from_secs(2), false, false).unwrap();
        Discovery::new(clients, Overrides::new(), Overrides::new(), false)
    }

    #[test]
    fn classifies_addresses() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            // NAT64, 6to4 and IPv4-compatible forms of private addresses.
            "64:ff9b::7f00:1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "2002:a00:1::",
            "2002:c0a8:101::5",
            "::10.0.0.1",
            // Teredo and NAT64's local-use prefix, whatever they carry.
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001::1",
            "64:ff9b:1::808:808",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "2a00:1450::1",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "::ffff:8.8.8.8",
            "2001:db9::1",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[tokio::test]
    async fn ip_literal_servers_in_private_ranges_are_refused() {
        let d = discovery();
        for server in ["127.0.0.1:8008", "[::1]:8448", "10.0.0.1"] {
            assert!(matches!(d.federation_api(server).await, Err(DiscoveryError::Forbidden { .. })), "{server}");
            assert!(matches!(d.client_server_api(server).await, Err(DiscoveryError::Forbidden { .. })), "{server}");
        }
        assert!(matches!(d.client_server_api("not a name").await, Err(DiscoveryError::InvalidServerName(_))));
    }

    #[tokio::test]
    async fn names_resolving_to_loopback_are_refused_at_connect_time() {
        // Something listens on loopback, so only the guard can keep us from reaching it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = format!("localhost:{}", listener.local_addr().unwrap().port());
        let accepted = tokio::spawn(async move { listener.accept().await.is_ok() });
        let err = discovery().client_server_api(&server).await.unwrap_err();
        match &err {
            DiscoveryError::Failed { reason, .. } => {
                assert!(reason.contains("resolves to no public address; refused"), "{reason}")
            }
            other => panic!("{other}"),
        }
        assert!(!accepted.is_finished(), "the guard let a connection through");
        // Control: without the guard (operators may allow private addresses) the same name
        // reaches the listener.
        let clients = Clients::new(Duration::from_secs(2), false, true).unwrap();
        let unguarded = Discovery::new(clients, Overrides::new(), Overrides::new(), true);
        let _ = unguarded.client_server_api(&server).await;
        assert!(tokio::time::timeout(Duration::from_secs(2), accepted).await.unwrap().unwrap());
    }

    #[tokio::test]
    async fn overrides_win_and_are_trusted() {
        let clients = Clients::new(Duration::from_secs(2), false, false).unwrap();
        let mut o = Overrides::new();
        o.insert("hs.test".into(), Url::parse("http://127.0.0.1:8008").unwrap());
        let d = Discovery::new(clients, o.clone(), o, false);
        let e = d.client_server_api("hs.test").await.unwrap();
        assert!(e.trusted);
        assert_eq!(e.base.as_str(), "http://127.0.0.1:8008/");
        assert!(d.federation_api("hs.test").await.unwrap().trusted);
    }
}
