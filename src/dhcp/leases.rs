//! The address pool of full-mode DHCP, sans IO: offers held for their client, bound leases, reservations,
//! declined addresses. Every change that must survive a restart is returned as a [`LeaseChange`] for the
//! shell to store before it answers.
//!
//! The boot network is shared with whatever runs on the nodes, so the pool defends itself: a DECLINE is
//! honoured only from the MAC holding the lease, right after its ACK (when a client's ARP probe finds the
//! address taken, RFC 2131 3.1.5), so nobody can block other clients' addresses; and when the pool is
//! exhausted, a node corral knows may take the address of the oldest lease held by a stranger (a MAC corral
//! has never seen boot), so a flood of invented MACs cannot starve the rack.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::domain::{LeaseChange, LeaseRecord, Mac};

/// How long a declined address (someone else answers ARP for it) is left alone.
const DECLINE_HOLD: u64 = 600;
/// Seconds after its ACK within which a client may decline its address: a client probes with ARP at
/// once after the ACK; a DECLINE later than that is not a conflict report but someone else's packet.
pub const DECLINE_WINDOW: u64 = 60;

/// What became of a DECLINE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Declined {
    /// The lease holder found the address in use: the lease is gone and the address held back.
    Honoured(Option<LeaseChange>),
    /// Not the holder of a fresh lease of that address: ignored.
    Ignored,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Offered and held for its client until `until`.
    Offered {
        until: u64,
    },
    Bound {
        expires: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    mac: Mac,
    state: State,
    client_id: Option<Vec<u8>>,
    hostname: Option<String>,
    /// When this MAC was last ACKed the address (in memory only: after a restart, no DECLINE is fresh).
    bound_at: Option<u64>,
}

impl Entry {
    fn live(&self, now: u64) -> bool {
        match self.state {
            State::Offered { until } => now < until,
            State::Bound { expires } => now < expires,
        }
    }
}

/// Why a REQUEST was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not ours to give (other subnet, outside the pool, someone else's).
    Wrong,
}

pub struct Pool {
    first: u32,
    last: u32,
    /// MAC → (address, hostname).
    reservations: HashMap<Mac, (Ipv4Addr, Option<String>)>,
    reserved: HashMap<u32, Mac>,
    leases: HashMap<u32, Entry>,
    by_mac: HashMap<Mac, u32>,
    declined: HashMap<u32, u64>,
    /// Where the search for a free address resumes: amortised O(1) per offer.
    cursor: u32,
}

impl Pool {
    pub fn new(
        first: Ipv4Addr,
        last: Ipv4Addr,
        reservations: Vec<(Mac, Ipv4Addr, Option<String>)>,
    ) -> Pool {
        let (first, last) = (u32::from(first), u32::from(last));
        let mut p = Pool {
            first,
            last,
            reservations: HashMap::new(),
            reserved: HashMap::new(),
            leases: HashMap::new(),
            by_mac: HashMap::new(),
            declined: HashMap::new(),
            cursor: first,
        };
        for (mac, ip, host) in reservations {
            p.reservations.insert(mac, (ip, host));
            p.reserved.insert(ip.into(), mac);
        }
        p
    }

    /// Restores stored leases (expired ones too: a returning client gets its old address back if free).
    pub fn load(&mut self, records: &[LeaseRecord]) {
        for r in records {
            let e = Entry {
                mac: r.mac,
                state: State::Bound { expires: r.expires },
                client_id: r.client_id.clone(),
                hostname: r.hostname.clone(),
                bound_at: None,
            };
            self.insert(u32::from(r.ip), e);
        }
    }

    fn insert(&mut self, ip: u32, e: Entry) {
        if let Some(old) = self.by_mac.insert(e.mac, ip) {
            if old != ip {
                self.leases.remove(&old);
            }
        }
        if let Some(prev) = self.leases.insert(ip, e) {
            if self.by_mac.get(&prev.mac) == Some(&ip) && prev.mac != self.leases[&ip].mac {
                self.by_mac.remove(&prev.mac);
            }
        }
    }

    pub fn in_range(&self, ip: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&u32::from(ip))
    }

    /// The reservation of a MAC, if any.
    pub fn reservation(&self, mac: Mac) -> Option<&(Ipv4Addr, Option<String>)> {
        self.reservations.get(&mac)
    }

    /// Whether `mac` may have `ip` now.
    fn available_to(&self, ip: u32, mac: Mac, now: u64) -> bool {
        if self.reserved.get(&ip).is_some_and(|m| *m != mac) {
            return false;
        }
        if self.declined.get(&ip).is_some_and(|until| now < *until) {
            return false;
        }
        match self.leases.get(&ip) {
            Some(e) if e.mac != mac => !e.live(now),
            _ => true,
        }
    }

    /// Picks and holds an address for a DISCOVER: the reservation, else the client's previous address,
    /// else the one it asks for, else the next free one. The hold keeps parallel boots from racing for
    /// one address.
    pub fn offer(
        &mut self,
        mac: Mac,
        requested: Option<Ipv4Addr>,
        now: u64,
        hold: u64,
        fixed: Option<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        self.offer_or_reclaim(mac, requested, now, hold, fixed, &|_| false)
            .map(|(ip, _)| ip)
    }

    /// [`Pool::offer`], and when the pool is exhausted and `known(mac)`, the address of the oldest lease
    /// held by a MAC that is not `known` (returned second, so the shell can count and log it).
    pub fn offer_or_reclaim(
        &mut self,
        mac: Mac,
        requested: Option<Ipv4Addr>,
        now: u64,
        hold: u64,
        fixed: Option<Ipv4Addr>,
        known: &dyn Fn(Mac) -> bool,
    ) -> Option<(Ipv4Addr, Option<Mac>)> {
        let (ip, reclaimed) = match self.choose(mac, requested, now, fixed) {
            Some(ip) => (ip, None),
            None if known(mac) => {
                let (ip, stranger) = self.stranger_lease(now, known)?;
                self.leases.remove(&ip);
                if self.by_mac.get(&stranger) == Some(&ip) {
                    self.by_mac.remove(&stranger);
                }
                (ip, Some(stranger))
            }
            None => return None,
        };
        // A bound lease stays bound (a rebooting client re-DISCOVERs); otherwise hold the offer.
        let bound = self.leases.get(&ip).is_some_and(|e| {
            e.mac == mac && matches!(e.state, State::Bound { expires } if expires > now)
        });
        if !bound {
            let prev = self.leases.get(&ip).filter(|e| e.mac == mac);
            let (client_id, hostname) = prev
                .map(|e| (e.client_id.clone(), e.hostname.clone()))
                .unwrap_or_default();
            self.insert(
                ip,
                Entry {
                    mac,
                    state: State::Offered { until: now + hold },
                    client_id,
                    hostname,
                    bound_at: None,
                },
            );
        }
        Some((Ipv4Addr::from(ip), reclaimed))
    }

    /// The pool address whose holder is a stranger and whose lease is oldest (bound longest ago, offers
    /// before bound leases), not reserved and not declined.
    fn stranger_lease(&self, now: u64, known: &dyn Fn(Mac) -> bool) -> Option<(u32, Mac)> {
        self.leases
            .iter()
            .filter(|(ip, e)| {
                (self.first..=self.last).contains(*ip)
                    && !self.reserved.contains_key(ip)
                    && self.declined.get(ip).is_none_or(|until| now >= *until)
                    && !known(e.mac)
            })
            .min_by_key(|(ip, e)| {
                let age = match e.state {
                    State::Offered { .. } => 0,
                    State::Bound { expires } => e.bound_at.unwrap_or(expires).max(1),
                };
                (age, **ip)
            })
            .map(|(ip, e)| (*ip, e.mac))
    }

    /// Drops what no longer matters: offers whose hold ran out, declines that ended, and leases expired
    /// more than `retention` seconds ago (returned, to be deleted from the store).
    pub fn prune(&mut self, now: u64, retention: u64) -> Vec<LeaseChange> {
        let mut gone = Vec::new();
        self.leases.retain(|ip, e| {
            let keep = match e.state {
                State::Offered { until } => now < until,
                State::Bound { expires } => expires.saturating_add(retention) > now,
            };
            if !keep {
                gone.push((*ip, e.mac, matches!(e.state, State::Bound { .. })));
            }
            keep
        });
        self.declined.retain(|_, until| now < *until);
        let mut changes = Vec::new();
        for (ip, mac, bound) in gone {
            if self.by_mac.get(&mac) == Some(&ip) {
                self.by_mac.remove(&mac);
            }
            if bound {
                changes.push(LeaseChange::Remove(Ipv4Addr::from(ip)));
            }
        }
        changes
    }

    fn choose(
        &mut self,
        mac: Mac,
        requested: Option<Ipv4Addr>,
        now: u64,
        fixed: Option<Ipv4Addr>,
    ) -> Option<u32> {
        if let Some(ip) = fixed.or_else(|| self.reservations.get(&mac).map(|r| r.0)) {
            return Some(u32::from(ip));
        }
        if let Some(&ip) = self.by_mac.get(&mac) {
            if self.available_to(ip, mac, now) && (self.first..=self.last).contains(&ip) {
                return Some(ip);
            }
        }
        if let Some(r) = requested.map(u32::from) {
            if (self.first..=self.last).contains(&r) && self.available_to(r, mac, now) {
                return Some(r);
            }
        }
        let size = (self.last - self.first) as u64 + 1;
        for k in 0..size {
            let ip = self.first + ((self.cursor - self.first) as u64 + k).rem_euclid(size) as u32;
            if self.available_to(ip, mac, now) {
                self.cursor = if ip == self.last { self.first } else { ip + 1 };
                return Some(ip);
            }
        }
        None
    }

    /// Binds `ip` to `mac` for a REQUEST.
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        &mut self,
        mac: Mac,
        ip: Ipv4Addr,
        now: u64,
        lease_time: u32,
        client_id: Option<Vec<u8>>,
        hostname: Option<String>,
        fixed: Option<Ipv4Addr>,
    ) -> Result<LeaseChange, Refusal> {
        let n = u32::from(ip);
        let mine = fixed.or_else(|| self.reservations.get(&mac).map(|r| r.0));
        let ok = match mine {
            Some(r) => r == ip,
            None => (self.first..=self.last).contains(&n) && self.available_to(n, mac, now),
        };
        if !ok {
            return Err(Refusal::Wrong);
        }
        let expires = now + lease_time as u64;
        self.insert(
            n,
            Entry {
                mac,
                state: State::Bound { expires },
                client_id: client_id.clone(),
                hostname: hostname.clone(),
                bound_at: Some(now),
            },
        );
        Ok(LeaseChange::Put(LeaseRecord {
            ip,
            mac,
            client_id,
            hostname,
            expires,
        }))
    }

    /// The client gave its address back.
    pub fn release(&mut self, mac: Mac, ip: Ipv4Addr) -> Option<LeaseChange> {
        let n = u32::from(ip);
        if self.leases.get(&n).is_some_and(|e| e.mac == mac) {
            self.leases.remove(&n);
            self.by_mac.remove(&mac);
            return Some(LeaseChange::Remove(ip));
        }
        None
    }

    /// The client found the address it was just given in use: keep it out of the pool for a while. Only
    /// the MAC holding the lease may say so, within [`DECLINE_WINDOW`] of its ACK (and with the client
    /// identifier it was bound with, if it gave one); anyone else's DECLINE is ignored.
    pub fn decline(
        &mut self,
        mac: Mac,
        ip: Ipv4Addr,
        client_id: Option<&[u8]>,
        now: u64,
    ) -> Declined {
        let fresh = self.leases.get(&u32::from(ip)).is_some_and(|e| {
            e.mac == mac
                && matches!(e.state, State::Bound { .. })
                && e.bound_at
                    .is_some_and(|at| now.saturating_sub(at) <= DECLINE_WINDOW)
                && (e.client_id.is_none() || e.client_id.as_deref() == client_id)
        });
        if !fresh {
            return Declined::Ignored;
        }
        let change = self.release(mac, ip);
        if self.in_range(ip) {
            self.declined.insert(u32::from(ip), now + DECLINE_HOLD);
        }
        Declined::Honoured(change)
    }

    /// A client chose another server: its offer is free again.
    pub fn forget_offer(&mut self, mac: Mac) {
        if let Some(&ip) = self.by_mac.get(&mac) {
            if matches!(
                self.leases.get(&ip).map(|e| &e.state),
                Some(State::Offered { .. })
            ) {
                self.leases.remove(&ip);
                self.by_mac.remove(&mac);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, n])
    }
    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn pool() -> Pool {
        Pool::new(
            ip("10.0.0.10"),
            ip("10.0.0.13"),
            vec![(mac(9), ip("10.0.0.5"), Some("nine".into()))],
        )
    }

    #[test]
    fn held_offers_are_never_given_twice() {
        let mut p = pool();
        let a = p.offer(mac(1), None, 100, 30, None).unwrap();
        let b = p.offer(mac(2), Some(a), 100, 30, None).unwrap();
        assert_ne!(a, b, "a held offer went to a second client");
        // The same client asking again gets the same address.
        assert_eq!(p.offer(mac(1), None, 101, 30, None), Some(a));
        // After the hold, the address is free again.
        assert_eq!(p.offer(mac(3), Some(a), 131, 30, None), Some(a));
    }

    #[test]
    fn exhaustion_and_reuse() {
        let mut p = pool();
        for i in 1..=4 {
            let a = p.offer(mac(i), None, 0, 30, None).unwrap();
            p.request(mac(i), a, 0, 100, None, None, None).unwrap();
        }
        assert_eq!(
            p.offer(mac(5), None, 50, 30, None),
            None,
            "pool of 4 is full"
        );
        // Expired leases are reused.
        assert!(p.offer(mac(5), None, 101, 30, None).is_some());
    }

    #[test]
    fn request_rules() {
        let mut p = pool();
        assert_eq!(
            p.request(mac(1), ip("10.0.1.10"), 0, 60, None, None, None),
            Err(Refusal::Wrong)
        );
        assert_eq!(
            p.request(mac(1), ip("10.0.0.5"), 0, 60, None, None, None),
            Err(Refusal::Wrong),
            "reserved for another"
        );
        assert!(p
            .request(mac(9), ip("10.0.0.5"), 0, 60, None, None, None)
            .is_ok());
        assert!(p
            .request(mac(1), ip("10.0.0.11"), 0, 60, None, None, None)
            .is_ok());
        assert_eq!(
            p.request(mac(2), ip("10.0.0.11"), 10, 60, None, None, None),
            Err(Refusal::Wrong),
            "bound to another"
        );
        // A client moving to another address frees its old one.
        assert!(p
            .request(mac(1), ip("10.0.0.12"), 10, 60, None, None, None)
            .is_ok());
        assert!(p
            .request(mac(2), ip("10.0.0.11"), 10, 60, None, None, None)
            .is_ok());
    }

    #[test]
    fn reservations_release_decline_and_restart() {
        let mut p = pool();
        assert_eq!(p.offer(mac(9), None, 0, 30, None), Some(ip("10.0.0.5")));
        let a = p.offer(mac(1), None, 0, 30, None).unwrap();
        let LeaseChange::Put(rec) = p
            .request(mac(1), a, 0, 3600, Some(vec![1]), Some("h".into()), None)
            .unwrap()
        else {
            panic!()
        };
        // A restarted pool from stored records gives the client its address back, and not to others.
        let mut q = pool();
        q.load(&[rec]);
        assert_ne!(q.offer(mac(2), Some(a), 10, 30, None), Some(a));
        assert_eq!(q.offer(mac(1), None, 10, 30, None), Some(a));
        assert_eq!(q.release(mac(1), a), Some(LeaseChange::Remove(a)));
        assert_eq!(q.release(mac(2), a), None, "not its lease");
        let b = q.offer(mac(3), None, 20, 30, None).unwrap();
        assert_eq!(
            q.decline(mac(3), b, None, 20),
            Declined::Ignored,
            "an offer is not a lease: nothing to decline"
        );
        q.request(mac(3), b, 20, 3600, None, None, None).unwrap();
        assert!(matches!(
            q.decline(mac(3), b, None, 21),
            Declined::Honoured(Some(_))
        ));
        assert_ne!(
            q.offer(mac(4), Some(b), 21, 30, None),
            Some(b),
            "declined address handed out"
        );
        // A fixed address from outside (a slot identity) wins.
        assert_eq!(
            q.offer(mac(6), None, 30, 30, Some(ip("10.0.0.200"))),
            Some(ip("10.0.0.200"))
        );
    }

    #[test]
    fn only_the_fresh_lease_holder_may_decline() {
        let mut p = pool();
        let a = p.offer(mac(1), None, 0, 30, None).unwrap();
        p.request(mac(1), a, 0, 3600, Some(vec![7]), None, None)
            .unwrap();
        // Someone else, for an address they do not hold: ignored, and the lease stays.
        assert_eq!(p.decline(mac(2), a, None, 1), Declined::Ignored);
        assert_eq!(p.decline(mac(2), a, Some(&[7]), 1), Declined::Ignored);
        // The holder's MAC with another client identifier: not the same client.
        assert_eq!(p.decline(mac(1), a, Some(&[8]), 1), Declined::Ignored);
        // Long after the ACK: a conflict is found at once, not minutes later.
        assert_eq!(
            p.decline(mac(1), a, Some(&[7]), DECLINE_WINDOW + 1),
            Declined::Ignored
        );
        assert_eq!(p.offer(mac(1), None, 100, 30, None), Some(a), "still its");
        // After a restart (stored leases) no DECLINE is fresh.
        let mut q = pool();
        q.load(&[LeaseRecord {
            ip: a,
            mac: mac(1),
            client_id: None,
            hostname: None,
            expires: 3600,
        }]);
        assert_eq!(q.decline(mac(1), a, None, 5), Declined::Ignored);
        // The holder right after its ACK: honoured, and the address is held back from everyone.
        let mut r = pool();
        let b = r.offer(mac(3), None, 10, 30, None).unwrap();
        r.request(mac(3), b, 10, 3600, None, None, None).unwrap();
        assert_eq!(
            r.decline(mac(3), b, None, 12),
            Declined::Honoured(Some(LeaseChange::Remove(b)))
        );
        for m in 4..8 {
            assert_ne!(r.offer(mac(m), Some(b), 13, 30, None), Some(b));
        }
    }

    #[test]
    fn known_nodes_reclaim_strangers_leases_when_the_pool_is_full() {
        let mut p = pool();
        // Four strangers fill the pool of four, bound at 1, 2, 3, 4.
        let mut held = Vec::new();
        for i in 1..=4u8 {
            let a = p.offer(mac(20 + i), None, u64::from(i), 30, None).unwrap();
            p.request(mac(20 + i), a, u64::from(i), 3600, None, None, None)
                .unwrap();
            held.push(a);
        }
        let known = |m: Mac| m == mac(1) || m == mac(22);
        // A stranger finds nothing; a known node takes the oldest stranger's address (mac 21's), not the
        // known mac 22's.
        assert_eq!(
            p.offer_or_reclaim(mac(30), None, 10, 30, None, &known),
            None
        );
        assert_eq!(
            p.offer_or_reclaim(mac(1), None, 10, 30, None, &known),
            Some((held[0], Some(mac(21))))
        );
        assert!(p
            .request(mac(1), held[0], 10, 3600, None, None, None)
            .is_ok());
        assert_eq!(
            p.request(mac(21), held[0], 11, 3600, None, None, None),
            Err(Refusal::Wrong),
            "the stranger lost it"
        );
        // Without `known`, nothing is ever reclaimed.
        assert_eq!(p.offer(mac(2), None, 12, 30, None), None);
    }

    #[test]
    fn prune_drops_long_expired_leases_only() {
        let mut p = pool();
        let a = p.offer(mac(1), None, 0, 30, None).unwrap();
        p.request(mac(1), a, 0, 100, None, None, None).unwrap();
        let b = p.offer(mac(2), None, 0, 30, None).unwrap();
        assert!(p.prune(50, 1000).is_empty(), "live lease, held offer");
        // The offer's hold ran out: gone, nothing to delete from the store.
        assert!(p.prune(200, 1000).is_empty());
        assert_eq!(p.offer(mac(3), Some(b), 200, 30, None), Some(b));
        // Expired at 100, kept 1000 s more: then pruned and deleted.
        assert!(p.prune(1099, 1000).is_empty());
        assert_eq!(p.prune(1101, 1000), vec![LeaseChange::Remove(a)]);
    }
}
