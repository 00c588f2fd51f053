//! Planner tests: the seed's scenarios replayed from a state and a clock, and properties over random
//! policies and node sets.

use super::*;
use crate::policy::{build, ClusterSpec, ImageLink, PolicyFile, Requires, Secs, Settings, Window};
use proptest::prelude::*;

fn mac(n: u16) -> Mac {
    Mac([0x52, 0x54, 0, 0, (n >> 8) as u8, n as u8])
}

fn spec(name: &str, priority: i32, min: u32, max: u32, default: u32, preempt: bool) -> ClusterSpec {
    ClusterSpec {
        name: name.into(),
        description: String::new(),
        priority,
        min,
        max,
        default: Some(default),
        preempt,
        entitlement: None,
        requires: Requires::default(),
        images: vec![ImageLink::Name(format!("{name}-img"))],
        disk: None,
        identity: None,
        drain: Default::default(),
        maintenance: None,
        schedule: vec![],
        scale: vec![],
        health: Default::default(),
    }
}

fn policy(clusters: Vec<ClusterSpec>, cooldown: u64) -> Policy {
    let file = PolicyFile {
        settings: Settings {
            cooldown: Secs(cooldown),
            ..Default::default()
        },
        clusters,
        ..Default::default()
    };
    let mut errs = Vec::new();
    let p = build(&file, &|_, _| true, &mut errs);
    assert!(errs.is_empty(), "{errs:?}");
    p
}

fn nodes(n: u16) -> imbl::OrdMap<Mac, NodeState> {
    (0..n).map(|i| (mac(i), NodeState::new(mac(i)))).collect()
}

fn slot(c: &str, s: u32) -> SlotRef {
    SlotRef {
        cluster: c.into(),
        slot: s,
    }
}

// 2026-11-23 07:59:00 UTC, a Monday.
const MON_0759: u64 = 1_795_420_740;

#[test]
fn fifth_node_gets_the_fifth_link() {
    let mut c = spec("app", 1, 0, 8, 5, false);
    c.images = ["l1", "l2", "l3", "l4", "l5"]
        .iter()
        .map(|s| ImageLink::Name(s.to_string()))
        .collect();
    let pol = policy(vec![c], 0);
    let mut st = State {
        nodes: nodes(5),
        ..Default::default()
    };
    for i in 0..4 {
        st.assignments.insert(mac(i), slot("app", i as u32));
    }
    let acts = plan(&pol, &st, MON_0759);
    assert_eq!(
        acts,
        vec![Action::Assign {
            node: mac(4),
            to: slot("app", 4),
            image: "l5".into()
        }]
    );
    // And the 6th and later members keep booting the last link.
    assert_eq!(pol.clusters[0].slot_images[7], "l5");
}

#[test]
fn no_unused_node_takes_least_utilised_of_lowest_priority() {
    let pol = policy(
        vec![
            spec("urgent", 10, 0, 4, 1, true),
            spec("batch", 1, 0, 4, 2, false),
            spec("dev", 5, 0, 4, 2, false),
        ],
        0,
    );
    let mut st = State {
        nodes: nodes(4),
        ..Default::default()
    };
    st.assignments.insert(mac(0), slot("batch", 0));
    st.assignments.insert(mac(1), slot("batch", 1));
    st.assignments.insert(mac(2), slot("dev", 0));
    st.assignments.insert(mac(3), slot("dev", 1));
    for (i, u) in [(0, 0.9), (1, 0.4), (2, 0.1), (3, 0.2)] {
        st.nodes.get_mut(&mac(i)).unwrap().utilisation = u;
    }
    let acts = plan(&pol, &st, MON_0759);
    // Least utilised first: mac(2) of `dev` (0.1) beats `batch`'s best (0.4).
    assert_eq!(
        acts[0],
        Action::Preempt {
            node: mac(2),
            from: slot("dev", 0),
            to: slot("urgent", 0),
            image: "urgent-img".into()
        }
    );
    // With equal utilisation, the lower-priority cluster gives.
    for i in 0..4 {
        st.nodes.get_mut(&mac(i)).unwrap().utilisation = 0.5;
    }
    let acts = plan(&pol, &st, MON_0759);
    assert_eq!(
        acts[0],
        Action::Preempt {
            node: mac(0),
            from: slot("batch", 0),
            to: slot("urgent", 0),
            image: "urgent-img".into()
        }
    );
}

#[test]
fn preemption_respects_min_busy_and_cooldown() {
    let pol = policy(
        vec![spec("hi", 10, 0, 3, 3, true), spec("lo", 1, 1, 3, 3, false)],
        600,
    );
    let mut st = State {
        nodes: nodes(3),
        ..Default::default()
    };
    for i in 0..3 {
        st.assignments.insert(mac(i), slot("lo", i as u32));
    }
    st.nodes.get_mut(&mac(0)).unwrap().busy = true;
    st.nodes.get_mut(&mac(1)).unwrap().last_moved = Some(MON_0759 - 60);
    let acts = plan(&pol, &st, MON_0759);
    // mac(0) busy, mac(1) moved a minute ago: only mac(2) can go; `lo` stays at ≥ min 1.
    assert_eq!(
        acts[0],
        Action::Preempt {
            node: mac(2),
            from: slot("lo", 2),
            to: slot("hi", 0),
            image: "hi-img".into()
        }
    );
    assert!(acts.contains(&Action::Alert {
        cluster: "hi".into(),
        alert: Alert::Short {
            desired: 3,
            current: 1
        }
    }));
    // After the cooldown mac(1) may move; `lo` would drop to 1 = min, allowed; never below.
    let later = apply(&st, &acts, MON_0759);
    let acts = plan(&pol, &later, MON_0759 + 601);
    let preempts: Vec<_> = acts
        .iter()
        .filter(|a| matches!(a, Action::Preempt { .. }))
        .collect();
    assert_eq!(preempts.len(), 1, "{acts:?}");
}

#[test]
fn maintenance_windows_and_take_busy_gate_what_may_be_taken() {
    let mut lo = spec("lo", 1, 0, 2, 2, false);
    // Only between 22:00 and 22:59 on Mondays.
    lo.maintenance = Some(vec!["* 22 * * 1".into()]);
    let pol = policy(vec![spec("hi", 10, 0, 2, 2, true), lo], 0);
    let mut st = State {
        nodes: nodes(2),
        ..Default::default()
    };
    st.assignments.insert(mac(0), slot("lo", 0));
    st.assignments.insert(mac(1), slot("lo", 1));
    let preempts = |acts: &[Action]| {
        acts.iter()
            .filter(|a| matches!(a, Action::Preempt { .. }))
            .count()
    };
    // 07:59 Monday: outside the window, nothing is taken, `hi` is short.
    assert_eq!(preempts(&plan(&pol, &st, MON_0759)), 0);
    // 22:00 Monday: inside, both go.
    let at_2200 = MON_0759 + (14 * 60 + 1) * 60;
    assert_eq!(preempts(&plan(&pol, &st, at_2200)), 2);
    // A busy node is not taken, even in the window, unless its cluster says take_busy.
    st.nodes.get_mut(&mac(0)).unwrap().busy = true;
    assert_eq!(preempts(&plan(&pol, &st, at_2200)), 1);
    let mut lo = spec("lo", 1, 0, 2, 2, false);
    lo.drain.take_busy = true;
    let pol = policy(vec![spec("hi", 10, 0, 2, 2, true), lo], 0);
    assert_eq!(preempts(&plan(&pol, &st, MON_0759)), 2);
}

#[test]
fn schedule_windows_change_desired_at_the_minute() {
    let mut c = spec("web", 1, 1, 8, 2, false);
    c.schedule = vec![Window {
        cron: "* 8-19 * * mon-fri".into(),
        count: 8,
    }];
    let pol = policy(vec![c], 0);
    let st = State::default();
    let d = |t| desired(&pol.clusters[0], &st, t, &Zone::default());
    assert_eq!(d(MON_0759), 2);
    assert_eq!(d(MON_0759 + 59), 2);
    assert_eq!(d(MON_0759 + 60), 8);
    assert_eq!(d(MON_0759 + 60 + 12 * 3600 - 1), 8);
    assert_eq!(d(MON_0759 + 60 + 12 * 3600), 2);
    // Scale targets win, clamped to [min, max].
    let st = State {
        scale_targets: [("web".to_string(), 20)].into(),
        ..Default::default()
    };
    assert_eq!(
        desired(&pol.clusters[0], &st, MON_0759, &Zone::default()),
        8
    );
}

#[test]
fn failed_node_slot_is_refilled_with_the_same_identity() {
    let mut c = spec("db", 1, 2, 2, 2, false);
    c.identity = Some(crate::policy::IdentitySpec {
        hostname: "db-{n}".into(),
        addresses: Some("10.9.0.1-10.9.0.2".into()),
    });
    let pol = policy(vec![c], 0);
    let mut st = State {
        nodes: nodes(3),
        ..Default::default()
    };
    st.assignments.insert(mac(0), slot("db", 0));
    st.assignments.insert(mac(1), slot("db", 1));
    st.nodes.get_mut(&mac(0)).unwrap().healthy = false;
    let acts = plan(&pol, &st, MON_0759);
    assert_eq!(
        acts,
        vec![
            Action::Release {
                node: mac(0),
                from: slot("db", 0)
            },
            Action::Assign {
                node: mac(2),
                to: slot("db", 0),
                image: "db-img".into()
            },
        ]
    );
    let id = &pol.clusters[0].identities[0];
    assert_eq!(
        (
            id.hostname.as_str(),
            id.address.unwrap().to_string().as_str()
        ),
        ("db-1", "10.9.0.1")
    );
}

#[test]
fn best_fit_takes_the_smallest_compatible_node() {
    let mut c = spec("gpu", 1, 0, 2, 1, false);
    c.requires = Requires {
        min_cpus: Some(4),
        tags: vec!["gpu".into()],
        ..Default::default()
    };
    let pol = policy(vec![c], 0);
    let mut st = State {
        nodes: nodes(4),
        ..Default::default()
    };
    for (i, cpus, gpu) in [(0, 64, true), (1, 8, true), (2, 2, true), (3, 4, false)] {
        let n = st.nodes.get_mut(&mac(i)).unwrap();
        n.cpus = Some(cpus);
        if gpu {
            n.tags.insert("gpu".into());
        }
    }
    let acts = plan(&pol, &st, 0);
    assert_eq!(
        acts,
        vec![Action::Assign {
            node: mac(1),
            to: slot("gpu", 0),
            image: "gpu-img".into()
        }]
    );
}

#[test]
fn scale_down_releases_highest_slots_but_never_busy_nodes() {
    let pol = policy(vec![spec("app", 1, 0, 4, 1, false)], 0);
    let mut st = State {
        nodes: nodes(4),
        ..Default::default()
    };
    for i in 0..4 {
        st.assignments.insert(mac(i), slot("app", i as u32));
    }
    st.nodes.get_mut(&mac(3)).unwrap().busy = true;
    let acts = plan(&pol, &st, 0);
    assert_eq!(
        acts,
        vec![
            Action::Release {
                node: mac(2),
                from: slot("app", 2)
            },
            Action::Release {
                node: mac(1),
                from: slot("app", 1)
            },
            Action::Release {
                node: mac(0),
                from: slot("app", 0)
            },
        ]
    );
    // The busy node keeps its slot: the cluster is at its desired count of 1.
}

// ---- properties ----

#[derive(Debug, Clone)]
struct Case {
    clusters: Vec<ClusterSpec>,
    nodes: Vec<NodeState>,
    assignments: Vec<(u16, usize, u32)>,
    cooldown: u64,
}

fn arb_case() -> impl Strategy<Value = Case> {
    let cluster = (
        0..4i32,
        0..3u32,
        0..4u32,
        0..4u32,
        any::<bool>(),
        proptest::option::of(0..2usize),
    );
    let node = (
        any::<bool>(),
        0..10u8,
        1..8u32,
        proptest::option::of(0..2usize),
        any::<bool>(),
        proptest::option::of(0..1200u64),
    );
    (
        proptest::collection::vec(cluster, 1..5),
        proptest::collection::vec(node, 0..14),
        proptest::collection::vec((0..14u16, 0..5usize, 0..6u32), 0..14),
        0..900u64,
    )
        .prop_map(|(cs, ns, asg, cooldown)| {
            let tags = ["gpu", "ssd"];
            let clusters = cs
                .into_iter()
                .enumerate()
                .map(|(i, (prio, min, extra_max, extra_def, preempt, tag))| {
                    let max = min + extra_max.max(1);
                    let default = (min + extra_def).min(max);
                    let mut c = spec(&format!("c{i}"), prio, min, max, default, preempt);
                    if let Some(t) = tag {
                        c.requires.tags = vec![tags[t].to_string()];
                    }
                    c
                })
                .collect();
            let nodes = ns
                .into_iter()
                .enumerate()
                .map(|(i, (busy, util, cpus, tag, healthy, moved_ago))| {
                    let mut n = NodeState::new(mac(i as u16));
                    n.busy = busy;
                    n.utilisation = util as f64 / 10.0;
                    n.cpus = Some(cpus);
                    n.healthy = healthy || i % 3 != 0;
                    n.last_moved = moved_ago.map(|a| MON_0759 - a);
                    if let Some(t) = tag {
                        n.tags.insert(tags[t].to_string());
                    }
                    n
                })
                .collect();
            Case {
                clusters,
                nodes,
                assignments: asg,
                cooldown,
            }
        })
}

fn build_case(case: &Case) -> (Policy, State) {
    let pol = policy(case.clusters.clone(), case.cooldown);
    let mut st = State::default();
    for n in &case.nodes {
        st.nodes.insert(n.mac, n.clone());
    }
    let mut used = BTreeSet::new();
    for &(n, c, s) in &case.assignments {
        // Existing state may be stale (slots beyond max, clusters gone) but never has one slot twice.
        let (m, cname) = (mac(n), format!("c{c}"));
        if st.nodes.contains_key(&m) && used.insert((cname.clone(), s)) {
            st.assignments.insert(
                m,
                SlotRef {
                    cluster: cname,
                    slot: s,
                },
            );
        }
    }
    (pol, st)
}

fn counts(pol: &Policy, st: &State) -> BTreeMap<String, usize> {
    let mut m: BTreeMap<String, usize> = pol
        .clusters
        .iter()
        .map(|c| (c.spec.name.clone(), 0))
        .collect();
    for s in st.assignments.values() {
        *m.entry(s.cluster.clone()).or_default() += 1;
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn planner_invariants(case in arb_case()) {
        let (pol, st) = build_case(&case);
        let now = MON_0759;
        let acts = plan(&pol, &st, now);
        // Deterministic.
        prop_assert_eq!(&acts, &plan(&pol, &st, now));
        let after = apply(&st, &acts, now);
        let before_counts = counts(&pol, &st);
        let after_counts = counts(&pol, &after);

        // No slot holds two nodes (a node holds one slot by construction of the map).
        let mut seen = BTreeSet::new();
        for s in after.assignments.values() {
            prop_assert!(seen.insert(s.clone()), "slot {:?} twice", s);
        }
        for c in &pol.clusters {
            let n = after_counts[&c.spec.name];
            // Never above max; assignments only to slots that exist.
            prop_assert!(n <= c.spec.max as usize);
            for s in after.assignments.values().filter(|s| s.cluster == c.spec.name) {
                prop_assert!(s.slot < c.spec.max);
            }
        }
        for a in &acts {
            match a {
                Action::Preempt { node, from, to, .. } => {
                    let n = &st.nodes[node];
                    prop_assert!(!n.busy, "busy node preempted");
                    let (v, h) = (pol.cluster(&from.cluster).unwrap(), pol.cluster(&to.cluster).unwrap());
                    prop_assert!(v.spec.priority < h.spec.priority);
                    prop_assert!(h.spec.preempt);
                    // The victim is never pushed below its min to serve another cluster.
                    let floor = (v.spec.min as usize).min(before_counts.get(&from.cluster).copied().unwrap_or(0));
                    prop_assert!(after_counts[&from.cluster] >= floor);
                }
                Action::Release { node, from } => {
                    // A busy node is released only when its assignment is no longer valid or it failed.
                    let n = &st.nodes[node];
                    if n.busy && n.healthy {
                        let valid = pol.cluster(&from.cluster).is_some_and(|c| from.slot < c.spec.max);
                        prop_assert!(!valid, "busy node released from a valid slot");
                    }
                }
                Action::Assign { node, .. } => {
                    prop_assert!(st.nodes[node].healthy);
                    let released = acts.iter().any(|b| matches!(b, Action::Release { node: m, .. } if m == node));
                    prop_assert!(!st.assignments.contains_key(node) || released, "assigned node assigned again");
                }
                Action::Alert { .. } => {}
            }
        }
        // A cluster short of its desired count leaves no usable node behind: no idle compatible node, and
        // (if it may preempt) no compatible, movable node in a lower-priority cluster above its min.
        for h in &pol.clusters {
            let want = desired(h, &st, now, &Zone::default()) as usize;
            if after_counts[&h.spec.name] >= want {
                continue;
            }
            for n in after.nodes.values() {
                if !n.healthy || !compatible(h, n) {
                    continue;
                }
                match after.assignments.get(&n.mac) {
                    None => prop_assert!(false, "{} short while {} idles", h.spec.name, n.mac),
                    Some(s) if h.spec.preempt => {
                        let l = pol.cluster(&s.cluster).unwrap();
                        let movable = !n.busy && !in_cooldown(n, now, pol.cooldown) && !in_cooldown(&st.nodes[&n.mac], now, pol.cooldown);
                        let moved_now = st.assignments.get(&n.mac) != Some(s);
                        if l.spec.priority < h.spec.priority && after_counts[&s.cluster] > l.spec.min as usize && movable && !moved_now {
                            prop_assert!(false, "{} short while {} of {} could be taken", h.spec.name, n.mac, l.spec.name);
                        }
                    }
                    Some(_) => {}
                }
            }
        }
        // No thrashing: planning again right after changes nothing.
        if pol.cooldown > 0 {
            let again: Vec<_> = plan(&pol, &after, now).into_iter().filter(|a| !matches!(a, Action::Alert { .. })).collect();
            prop_assert!(again.is_empty(), "re-plan moved nodes again: {:?}", again);
        }
    }
}

#[test]
fn a_slow_node_hands_its_slot_to_a_capable_node_or_stays() {
    let pol = policy(
        vec![
            spec("web", 5, 1, 2, 2, true),
            spec("batch", 1, 0, 2, 1, false),
        ],
        0,
    );
    let mut st = State {
        nodes: nodes(5),
        ..Default::default()
    };
    for (i, mem) in [(0, 4096), (1, 4096), (2, 2048), (3, 8192), (4, 4096)] {
        st.nodes.get_mut(&mac(i)).unwrap().memory = Some(mem);
    }
    st.assignments.insert(mac(0), slot("web", 0));
    st.assignments.insert(mac(1), slot("web", 1));
    st.assignments.insert(mac(4), slot("batch", 0));
    st.slow.insert(mac(1));
    // Idle: mac 2 (smaller: never) and mac 3 (bigger): mac 3 takes web/1, keeping its identity.
    let acts = plan(&pol, &st, MON_0759);
    assert_eq!(
        acts,
        vec![
            Action::Release {
                node: mac(1),
                from: slot("web", 1)
            },
            Action::Assign {
                node: mac(3),
                to: slot("web", 1),
                image: "web-img".into()
            },
        ]
    );
    // No capable idle node: an equal node of a lower-priority cluster is preempted.
    st.nodes.remove(&mac(3));
    let acts = plan(&pol, &st, MON_0759);
    assert_eq!(
        acts[..2],
        [
            Action::Release {
                node: mac(1),
                from: slot("web", 1)
            },
            Action::Preempt {
                node: mac(4),
                from: slot("batch", 0),
                to: slot("web", 1),
                image: "web-img".into()
            },
        ]
    );
    // The slow node itself is not handed straight to batch in the same plan.
    assert!(!acts
        .iter()
        .any(|a| matches!(a, Action::Assign { node, .. } if *node == mac(1))));
    // Nothing capable at all (batch at its min cannot give): the slow node stays.
    let mut pol2 = pol.clone();
    pol2.clusters[1].spec.min = 1;
    assert_eq!(plan(&pol2, &st, MON_0759), vec![]);
}

#[test]
fn a_blocked_slot_gets_no_node_and_the_cluster_fills_another() {
    let pol = policy(vec![spec("app", 1, 0, 4, 2, false)], 0);
    let mut st = State {
        nodes: nodes(3),
        ..Default::default()
    };
    st.assignments.insert(mac(0), slot("app", 0));
    st.blocked.insert(slot("app", 1));
    let acts = plan(&pol, &st, 0);
    assert_eq!(
        acts,
        vec![Action::Assign {
            node: mac(1),
            to: slot("app", 2),
            image: "app-img".into()
        }]
    );
    // With every free slot blocked the cluster stays short, and says so.
    st.blocked.extend([slot("app", 2), slot("app", 3)]);
    let acts = plan(&pol, &st, 0);
    assert!(
        acts.iter().all(|a| matches!(a, Action::Alert { .. })),
        "{acts:?}"
    );
    assert!(!acts.is_empty());
}
