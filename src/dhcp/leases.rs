//! The address pool of full-mode DHCP, sans IO: offers held for their client, bound leases, reservations,
//! declined addresses. Every change that must survive a restart is returned as a [`LeaseChange`] for the
//! shell to store before it answers.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use crate::mac::Mac;
pub use crate::store::LeaseChange;
use crate::store::LeaseRecord;

/// How long a declined address (someone else answers ARP for it) is left alone.
const DECLINE_HOLD: u64 = 600;

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
        let ip = self.choose(mac, requested, now, fixed)?;
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
                },
            );
        }
        Some(Ipv4Addr::from(ip))
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

    /// The client found the address in use: keep it out of the pool for a while.
    pub fn decline(&mut self, mac: Mac, ip: Ipv4Addr, now: u64) -> Option<LeaseChange> {
        let change = self.release(mac, ip);
        if self.in_range(ip) {
            self.declined.insert(u32::from(ip), now + DECLINE_HOLD);
        }
        change
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
        q.decline(mac(3), b, 20);
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
}
