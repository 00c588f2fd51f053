//! Who a node is, and what a request may be given on its behalf. Sans IO: DHCP sightings, script requests
//! and agent tokens go in with `now`; decisions come out.
//!
//! The boot network is shared with whatever runs on the nodes, so a request that *names* a node (its MAC
//! in `/boot/<mac>`) proves nothing. A node is who corral's own DHCP says it is: the address it leased the
//! node, the node's reservation, its slot's identity address, or in proxy mode the address the node asks
//! the site server for. Only a request from that address is the node's own: only it gets the node's
//! secrets (its agent token, its slot's CHAP secrets), and only it changes anything (discovery, facts,
//! holds, move confirmations). The address a request comes from is otherwise a fact for display.
//!
//! A *boot* starts with a DHCP exchange of that MAC ([`Sightings`] counts them as epochs). Within a boot
//! the node's script is idempotent: the same token however often it is fetched ([`TokenBook`]). A new
//! boot's token replaces the old one only once it is first used, so a script fetched but never booted
//! cannot cut off an agent that is running.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use crate::config::DiscoveryAllow;
use crate::dhcp::core::Sighting;
use crate::domain::{Mac, SlotRef};

/// What corral's DHCP knows of one MAC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// The address DHCP knows the node by, and until when (None: no end known, as in proxy mode).
    pub address: Option<Ipv4Addr>,
    pub until: Option<u64>,
    /// Boots seen since corral started (DHCP exchanges that begin one).
    pub epoch: u64,
    /// Unix seconds of the last sighting.
    pub at: u64,
}

/// What corral's DHCP has seen, per MAC, with one MAC per address: an address a node gives up to another
/// MAC stops being the first node's at once. Bounded: past `cap` MACs the oldest strangers (MACs the
/// controller does not know) are forgotten, never a known node's.
#[derive(Debug)]
pub struct Sightings {
    by_mac: HashMap<Mac, Seen>,
    by_addr: HashMap<Ipv4Addr, Mac>,
    cap: usize,
}

impl Sightings {
    pub fn new(cap: usize) -> Sightings {
        Sightings {
            by_mac: HashMap::new(),
            by_addr: HashMap::new(),
            cap: cap.max(2),
        }
    }

    /// Records a sighting. `known` tells which MACs must never be forgotten to make room.
    pub fn observe(&mut self, s: &Sighting, now: u64, known: &dyn Fn(Mac) -> bool) {
        let e = self.by_mac.entry(s.mac).or_default();
        e.at = now;
        if s.boot {
            e.epoch += 1;
        }
        if let Some(a) = s.address {
            let old = e.address.replace(a);
            e.until = s.valid_for.map(|v| now + u64::from(v));
            if old != Some(a) {
                if let Some(old) = old {
                    if self.by_addr.get(&old) == Some(&s.mac) {
                        self.by_addr.remove(&old);
                    }
                }
            }
            if let Some(prev) = self.by_addr.insert(a, s.mac) {
                if prev != s.mac {
                    if let Some(p) = self.by_mac.get_mut(&prev) {
                        if p.address == Some(a) {
                            p.address = None;
                            p.until = None;
                        }
                    }
                }
            }
        }
        if self.by_mac.len() > self.cap {
            self.forget_strangers(known);
        }
    }

    /// A stored lease, at start: the address is the MAC's until it expires (no boot is counted).
    pub fn restore(&mut self, mac: Mac, address: Ipv4Addr, expires: u64) {
        let e = self.by_mac.entry(mac).or_default();
        if e.address.is_none() {
            e.address = Some(address);
            e.until = Some(expires);
            self.by_addr.entry(address).or_insert(mac);
        }
    }

    /// Drops the older half of the strangers (amortised: one pass per cap/2 new MACs).
    fn forget_strangers(&mut self, known: &dyn Fn(Mac) -> bool) {
        let mut strangers: Vec<(u64, Mac)> = self
            .by_mac
            .iter()
            .filter(|(m, _)| !known(**m))
            .map(|(m, e)| (e.at, *m))
            .collect();
        strangers.sort_unstable();
        let drop = strangers
            .len()
            .min(self.by_mac.len().saturating_sub(self.cap / 2));
        for (_, m) in strangers.into_iter().take(drop) {
            if let Some(e) = self.by_mac.remove(&m) {
                if let Some(a) = e.address {
                    if self.by_addr.get(&a) == Some(&m) {
                        self.by_addr.remove(&a);
                    }
                }
            }
        }
    }

    pub fn get(&self, mac: Mac) -> Option<&Seen> {
        self.by_mac.get(&mac)
    }

    /// The address DHCP knows `mac` by now (a lease that ran out is nobody's).
    pub fn address(&self, mac: Mac, now: u64) -> Option<Ipv4Addr> {
        let e = self.by_mac.get(&mac)?;
        e.address.filter(|_| e.until.is_none_or(|u| now < u))
    }

    /// The boot `mac` is in, as far as DHCP saw (None: DHCP never saw it since corral started).
    pub fn epoch(&self, mac: Mac) -> Option<u64> {
        self.by_mac.get(&mac).map(|e| e.epoch)
    }

    pub fn len(&self) -> usize {
        self.by_mac.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_mac.is_empty()
    }
}

/// Every address a node is known by (the sources corral trusts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KnownAddresses {
    pub reservation: Option<Ipv4Addr>,
    /// Its slot's identity address, when it fills a slot whose cluster names addresses.
    pub slot: Option<Ipv4Addr>,
    /// What DHCP knows it by now (lease, or proxy-mode request).
    pub dhcp: Option<Ipv4Addr>,
    /// The address its last own script request came from: counted only with
    /// `boot.trust_request_address`.
    pub request: Option<IpAddr>,
}

impl KnownAddresses {
    pub fn contains(&self, peer: IpAddr) -> bool {
        let v4 = match peer {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(a) => a.to_ipv4_mapped(),
        };
        let ours = [self.reservation, self.slot, self.dhcp];
        v4.is_some_and(|a| ours.contains(&Some(a))) || self.request == Some(peer)
    }

    pub fn list(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = [self.reservation, self.slot, self.dhcp]
            .into_iter()
            .flatten()
            .map(IpAddr::V4)
            .collect();
        out.extend(self.request);
        out.dedup();
        out
    }
}

/// One token handed to one boot of a node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    pub token: String,
    pub role: Option<SlotRef>,
    /// The DHCP epoch of the boot it was issued to (0: corral's DHCP had not seen the node since start).
    pub epoch: u64,
    pub issued: u64,
    /// The agent has used it (a heartbeat, an order poll or an ack).
    pub used: bool,
}

/// A node's tokens: the current boot's, and the previous boot's until the current one is first used.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeTokens {
    pub current: Grant,
    pub previous: Option<Grant>,
}

/// What to persist after a token decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenChange {
    /// The node's tokens are now these.
    Put(Mac, NodeTokens),
}

/// Every node's tokens, and who holds which.
#[derive(Debug, Default)]
pub struct TokenBook {
    by_mac: HashMap<Mac, NodeTokens>,
    by_token: HashMap<String, Mac>,
}

impl TokenBook {
    /// Restores stored tokens.
    pub fn restore(&mut self, mac: Mac, t: NodeTokens) {
        self.by_token.insert(t.current.token.clone(), mac);
        if let Some(p) = &t.previous {
            self.by_token.insert(p.token.clone(), mac);
        }
        self.by_mac.insert(mac, t);
    }

    /// The token for the node's script in boot `epoch` with `role` (`epoch` None: corral's DHCP does not
    /// see this node, so a boot is told by its token: the current one is handed out again until it is
    /// used). The same boot and role get the same token; otherwise `fresh()` makes a new one, and the old
    /// one stays valid until the new one is used.
    pub fn for_script(
        &mut self,
        mac: Mac,
        epoch: Option<u64>,
        role: Option<&SlotRef>,
        now: u64,
        fresh: impl FnOnce() -> String,
    ) -> (String, Option<TokenChange>) {
        if let Some(t) = self.by_mac.get(&mac) {
            let c = &t.current;
            let same_boot = match epoch {
                Some(e) => e == c.epoch,
                None => !c.used,
            };
            if same_boot && c.role.as_ref() == role {
                return (c.token.clone(), None);
            }
        }
        let token = fresh();
        let grant = Grant {
            token: token.clone(),
            role: role.cloned(),
            epoch: epoch.unwrap_or(0),
            issued: now,
            used: false,
        };
        let previous = match self.by_mac.remove(&mac) {
            Some(old) => {
                // Only one earlier token lives on: the current one, if its boot may still be running.
                if let Some(p) = old.previous {
                    self.by_token.remove(&p.token);
                }
                if old.current.used {
                    Some(old.current)
                } else {
                    // Never used: no agent runs with it.
                    self.by_token.remove(&old.current.token);
                    None
                }
            }
            None => None,
        };
        let t = NodeTokens {
            current: grant,
            previous,
        };
        self.by_token.insert(token.clone(), mac);
        self.by_mac.insert(mac, t.clone());
        (token, Some(TokenChange::Put(mac, t)))
    }

    /// Who holds `token`: the node, the role its boot was given, and whether it is the node's current
    /// token. Using the current token for the first time retires the previous one.
    pub fn authenticate(
        &mut self,
        token: &str,
    ) -> Option<(Mac, Option<SlotRef>, bool, Option<TokenChange>)> {
        let mac = *self.by_token.get(token)?;
        let t = self.by_mac.get_mut(&mac)?;
        if t.current.token == token {
            if t.current.used {
                return Some((mac, t.current.role.clone(), true, None));
            }
            t.current.used = true;
            if let Some(p) = t.previous.take() {
                self.by_token.remove(&p.token);
            }
            let role = t.current.role.clone();
            let change = TokenChange::Put(mac, t.clone());
            return Some((mac, role, true, Some(change)));
        }
        let p = t.previous.as_ref().filter(|p| p.token == token)?;
        Some((mac, p.role.clone(), false, None))
    }

    /// Checks a token without using it.
    pub fn holder(&self, token: &str) -> Option<Mac> {
        self.by_token.get(token).copied()
    }

    pub fn tokens(&self, mac: Mac) -> Option<&NodeTokens> {
        self.by_mac.get(&mac)
    }

    /// The node leaves the inventory: its tokens die.
    pub fn forget(&mut self, mac: Mac) {
        if let Some(t) = self.by_mac.remove(&mac) {
            self.by_token.remove(&t.current.token);
            if let Some(p) = t.previous {
                self.by_token.remove(&p.token);
            }
        }
    }
}

/// Why an unknown MAC was not taken into the inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotDiscovered {
    /// `discovery.allow = "listed"` and the MAC is not listed.
    NotListed,
    /// `discovery.max_unassigned` unassigned discovered nodes already.
    TooMany,
    /// The peer introduced `discovery.rate_per_peer` new nodes within the last minute.
    RateLimited,
}

impl NotDiscovered {
    pub fn as_str(self) -> &'static str {
        match self {
            NotDiscovered::NotListed => "not listed in the policy or the reservations",
            NotDiscovered::TooMany => "too many unassigned discovered nodes",
            NotDiscovered::RateLimited => "too many new nodes from this address",
        }
    }
}

/// Whether a MAC corral does not know yet joins the inventory. `listed`: in the policy's `[[node]]` or a
/// reservation; the request has already been found to come from the node's address.
pub fn may_discover(
    allow: DiscoveryAllow,
    listed: bool,
    unassigned: usize,
    max_unassigned: usize,
    rate_ok: bool,
) -> Result<(), NotDiscovered> {
    if listed {
        // The operator named it: no bound applies.
        return Ok(());
    }
    if allow == DiscoveryAllow::Listed {
        return Err(NotDiscovered::NotListed);
    }
    if unassigned >= max_unassigned {
        return Err(NotDiscovered::TooMany);
    }
    if !rate_ok {
        return Err(NotDiscovered::RateLimited);
    }
    Ok(())
}

/// New nodes per peer per minute: a token bucket per address, bounded in the addresses it remembers.
#[derive(Debug)]
pub struct PeerRate {
    per_minute: u32,
    buckets: HashMap<IpAddr, (f64, u64)>,
    cap: usize,
}

impl PeerRate {
    pub fn new(per_minute: u32, cap: usize) -> PeerRate {
        PeerRate {
            per_minute: per_minute.max(1),
            buckets: HashMap::new(),
            cap: cap.max(1),
        }
    }

    /// Takes one from `peer`'s bucket if it has one.
    pub fn allow(&mut self, peer: IpAddr, now: u64) -> bool {
        let full = f64::from(self.per_minute);
        if self.buckets.len() >= self.cap && !self.buckets.contains_key(&peer) {
            // Buckets that refilled completely carry no information.
            let rate = full / 60.0;
            self.buckets
                .retain(|_, (t, at)| *t + (now.saturating_sub(*at) as f64) * rate < full);
            if self.buckets.len() >= self.cap {
                return false;
            }
        }
        let (tokens, at) = self.buckets.entry(peer).or_insert((full, now));
        *tokens = (*tokens + (now.saturating_sub(*at) as f64) * full / 60.0).min(full);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Compares secrets in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// 128 random bits, hex: tokens and generated secrets.
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::getrandom(&mut b).expect("the kernel's random source");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests;
