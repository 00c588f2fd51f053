use super::*;

fn mac(n: u8) -> Mac {
    Mac([0x52, 0x54, 0, 0, 0, n])
}
fn slot() -> SlotRef {
    SlotRef {
        cluster: "web".into(),
        slot: 1,
    }
}
const POOL: Rules = Rules {
    on_failure: OnFailure::Pool,
    attempts: 2,
    boot_timeout_ms: 60_000,
};
const QUARANTINE: Rules = Rules {
    on_failure: OnFailure::Quarantine,
    ..POOL
};
fn kinds(out: &[Output]) -> Vec<String> {
    out.iter()
        .map(|o| match o {
            Output::Event { kind, .. } => kind.to_string(),
            Output::Alert { .. } => "ALERT".into(),
            o => format!("{o:?}")
                .split([' ', '(', '{'])
                .next()
                .unwrap()
                .into(),
        })
        .collect()
}
fn failed(m: &mut Failovers, n: u8, now: u64, rules: Rules) -> Vec<Output> {
    m.on(
        Input::Failed {
            mac: mac(n),
            slot: slot(),
            reason: "no heartbeat for 10 s".into(),
            began_ms: now.saturating_sub(10_000),
            rules,
        },
        now,
    )
}
fn look(m: &mut Failovers, view: SlotView, now: u64) -> Vec<Output> {
    m.on(
        Input::Look {
            slot: slot(),
            view,
            rules: POOL,
        },
        now,
    )
}
fn owned(n: u8, bootable: bool, confirmed: bool) -> SlotView {
    SlotView {
        wanted: true,
        owner: Some(mac(n)),
        bootable,
        confirmed,
        moving: false,
    }
}

#[test]
fn a_failed_node_is_held_then_fenced_and_its_replacement_confirmed() {
    let mut m = Failovers::default();
    let out = failed(&mut m, 1, 100_000, POOL);
    assert_eq!(
        kinds(&out),
        [
            "Began",
            "health-failed",
            "Unwatch",
            "Hold",
            "MarkFailed",
            "Plan",
            "Fence"
        ]
    );
    // The hold comes before the mark and the plan: nothing can hand the disk over in between.
    let Output::Event { secs, .. } = &out[1] else {
        panic!()
    };
    assert_eq!(*secs, Some(10.0));
    assert!(m.failing(mac(1), &slot()));
    // The planner picked node 2; it is woken.
    let out = look(&mut m, owned(2, false, false), 100_250);
    assert_eq!(kinds(&out), ["failover-assign", "Wake"]);
    // While the fence runs, the replacement's clock does not start.
    assert_eq!(look(&mut m, owned(2, false, false), 170_000), []);
    assert_eq!(m.running()[&slot()].new, Some((mac(2), 170_000)));
    // The fence ends: settle, release, event, switch on again.
    let out = m.on(
        Input::Fenced {
            mac: mac(1),
            slot: slot(),
            off: true,
            how: "switched off".into(),
            fixed_address: false,
            took: Duration::from_millis(100),
        },
        170_100,
    );
    assert_eq!(kinds(&out), ["Settle", "Release", "fence", "Restart"]);
    assert_eq!(
        out[0],
        Output::Settle {
            slot: slot(),
            until_ms: 170_100 + FENCE_SETTLE_MS
        }
    );
    // Bootable, not yet up: nothing; 60 s from when it could boot is still within the timeout.
    assert_eq!(look(&mut m, owned(2, true, false), 230_000), []);
    m.on(
        Input::Worked {
            slot: slot(),
            took: Duration::from_millis(40),
        },
        230_000,
    );
    let out = look(&mut m, owned(2, true, true), 231_000);
    assert_eq!(kinds(&out), ["failover-done", "Done"]);
    let Output::Event { message, secs, .. } = &out[0] else {
        panic!()
    };
    assert_eq!(*secs, Some(141.0));
    assert!(
        message.contains("detected after 10.00 s, 0.140 s"),
        "{message}"
    );
    assert!(m.running().is_empty());
}

#[test]
fn quarantine_settles_instead_of_holding_and_never_fences() {
    let mut m = Failovers::default();
    let out = failed(&mut m, 1, 50_000, QUARANTINE);
    assert_eq!(
        kinds(&out),
        [
            "Began",
            "health-failed",
            "Unwatch",
            "Settle",
            "MarkFailed",
            "Plan",
            "quarantine"
        ]
    );
    assert!(out.contains(&Output::MarkFailed {
        mac: mac(1),
        quarantine: true,
        reason: "no heartbeat for 10 s".into()
    }));
}

#[test]
fn a_replacement_that_does_not_come_up_is_failed_fenced_and_another_tried_then_it_gives_up() {
    let mut m = Failovers::default();
    failed(&mut m, 1, 0, POOL);
    look(&mut m, owned(2, true, false), 1_000);
    // Moving (the mover drains it): the timeout waits.
    let mut moving = owned(2, true, false);
    moving.moving = true;
    assert_eq!(look(&mut m, moving, 62_000), []);
    let out = look(&mut m, owned(2, true, false), 62_000);
    assert_eq!(
        kinds(&out),
        ["node-failed", "Hold", "MarkFailed", "Fence", "Plan"]
    );
    assert!(out.contains(&Output::Hold {
        mac: mac(2),
        slot: slot()
    }));
    // Attempt 2 with node 3, which also fails: that was the last allowed.
    let out = look(&mut m, owned(3, true, false), 62_500);
    let Output::Event { message, .. } = &out[0] else {
        panic!()
    };
    assert!(message.ends_with("(attempt 2 of 2)"), "{message}");
    let out = look(&mut m, owned(3, true, false), 123_000);
    assert_eq!(
        kinds(&out),
        [
            "node-failed",
            "Hold",
            "MarkFailed",
            "Fence",
            "ALERT",
            "Plan"
        ]
    );
    assert!(m.running().is_empty());
}

#[test]
fn no_eligible_node_alerts_once_and_keeps_trying() {
    let mut m = Failovers::default();
    failed(&mut m, 1, 0, POOL);
    let none = SlotView {
        wanted: true,
        ..SlotView::default()
    };
    assert_eq!(kinds(&look(&mut m, none, 250)), ["ALERT"]);
    assert_eq!(look(&mut m, none, 500), []);
    assert!(m.failing(mac(1), &slot()));
    // A node appears later: it takes over.
    assert_eq!(
        kinds(&look(&mut m, owned(4, true, false), 9_000)),
        ["failover-assign", "Wake"]
    );
}

#[test]
fn a_slot_no_longer_wanted_or_given_back_to_its_old_node_ends_silently() {
    let mut m = Failovers::default();
    failed(&mut m, 1, 0, POOL);
    assert_eq!(look(&mut m, SlotView::default(), 250), []);
    assert!(m.running().is_empty());
    failed(&mut m, 1, 1_000, POOL);
    assert_eq!(look(&mut m, owned(1, true, true), 1_250), []);
    assert!(m.running().is_empty());
}

#[test]
fn churn_alerts_once_per_window() {
    let mut m = Failovers::default();
    for i in 0..3u64 {
        let out = failed(&mut m, 1, 1_000 + i * 1_000, POOL);
        assert_eq!(kinds(&out)[0] == "ALERT", i == 2, "{i}: {out:?}");
    }
    // A fourth within the window: said already.
    assert_ne!(kinds(&failed(&mut m, 1, 5_000, POOL))[0], "ALERT");
    // After the window has emptied, the count starts again.
    let later = 5_000 + CHURN_WINDOW_MS + 1;
    assert_ne!(kinds(&failed(&mut m, 1, later, POOL))[0], "ALERT");
}

#[test]
fn a_slow_node_moves_only_when_the_planner_found_a_capable_node() {
    let mut m = Failovers::default();
    let slow = |m: &mut Failovers, now| {
        m.on(
            Input::Slow {
                mac: mac(1),
                slot: slot(),
                reason: "p99 > 200 ms for 30 s".into(),
                began_ms: now - 30_000,
                rules: POOL,
            },
            now,
        )
    };
    let planned = |m: &mut Failovers, moved, now| {
        m.on(
            Input::SlowPlanned {
                mac: mac(1),
                slot: slot(),
                reason: "p99 > 200 ms for 30 s".into(),
                began_ms: now - 30_000,
                moved,
            },
            now,
        )
    };
    assert_eq!(
        slow(&mut m, 40_000),
        [Output::PlanSlow {
            mac: mac(1),
            slot: slot(),
            reason: "p99 > 200 ms for 30 s".into(),
            began_ms: 10_000,
        }]
    );
    // No capable node: it stays, said once, looked at again after SLOW_RETRY_MS.
    let out = planned(&mut m, false, 40_000);
    assert_eq!(kinds(&out), ["slow-stay"]);
    assert!(!m.slow_due(mac(1), 45_000));
    assert!(m.slow_due(mac(1), 40_000 + SLOW_RETRY_MS));
    assert_eq!(planned(&mut m, false, 50_000), []);
    // Each further look that finds nobody waits twice as long, up to SLOW_RETRY_MAX_MS.
    assert!(!m.slow_due(mac(1), 50_000 + 2 * SLOW_RETRY_MS - 1));
    assert!(m.slow_due(mac(1), 50_000 + 2 * SLOW_RETRY_MS));
    let mut at = 50_000;
    let mut wait = 2 * SLOW_RETRY_MS;
    for _ in 0..10 {
        at += wait;
        assert_eq!(planned(&mut m, false, at), [], "said once");
        wait = (wait * 2).min(SLOW_RETRY_MAX_MS);
        assert!(!m.slow_due(mac(1), at + wait - 1));
        assert!(m.slow_due(mac(1), at + wait));
    }
    assert_eq!(wait, SLOW_RETRY_MAX_MS);
    // The verdict clears: it may be said again later.
    m.cleared(mac(1));
    assert!(m.slow_due(mac(1), 50_001));
    // A capable node: the slot moves; later looks find the new owner and confirm it.
    let out = planned(&mut m, true, 60_000);
    assert_eq!(kinds(&out), ["Began", "health-slow", "Unwatch"]);
    assert!(m.running()[&slot()].slow);
    // A slow verdict on a slot already failing over is ignored.
    assert_eq!(slow(&mut m, 61_000), []);
    look(&mut m, owned(2, true, false), 61_000);
    let out = look(&mut m, owned(2, true, true), 75_000);
    let Output::Event { message, .. } = &out[0] else {
        panic!()
    };
    assert!(message.contains("(was slow: p99"), "{message}");
}

#[test]
fn a_slow_slot_that_churned_stays() {
    let mut m = Failovers::default();
    for i in 0..2 {
        failed(&mut m, 1, 1_000 + i, POOL);
        look(&mut m, SlotView::default(), 1_100 + i);
    }
    let out = m.on(
        Input::Slow {
            mac: mac(5),
            slot: slot(),
            reason: "slow".into(),
            began_ms: 0,
            rules: POOL,
        },
        2_000,
    );
    let Output::Event { kind, message, .. } = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(*kind, EventKind::SlowStay);
    assert!(message.contains("already failed over 2 times"), "{message}");
}

#[test]
fn a_slow_node_with_no_replacement_alerts_and_ends() {
    let mut m = Failovers::default();
    m.on(
        Input::SlowPlanned {
            mac: mac(1),
            slot: slot(),
            reason: "slow".into(),
            began_ms: 0,
            moved: true,
        },
        1_000,
    );
    let none = SlotView {
        wanted: true,
        ..SlotView::default()
    };
    assert_eq!(kinds(&look(&mut m, none, 1_250)), ["ALERT"]);
    assert!(m.running().is_empty());
}

#[test]
fn a_fence_that_cannot_switch_off_a_fixed_address_node_keeps_the_hold() {
    let mut m = Failovers::default();
    let fenced = |m: &mut Failovers, fixed_address| {
        m.on(
            Input::Fenced {
                mac: mac(1),
                slot: slot(),
                off: false,
                how: "no power control and no agent".into(),
                fixed_address,
                took: Duration::ZERO,
            },
            9_000,
        )
    };
    let out = fenced(&mut m, true);
    assert_eq!(kinds(&out), ["ALERT"]);
    // Without a fixed address, closing the export fences it; it is not switched on again.
    assert_eq!(
        kinds(&fenced(&mut m, false)),
        ["Settle", "Release", "fence"]
    );
}

#[test]
fn restored_failovers_keep_the_running_one() {
    let mut m = Failovers::default();
    failed(&mut m, 1, 0, POOL);
    let mut other = m.running()[&slot()].clone();
    other.old = mac(9);
    m.restore(slot(), other.clone());
    assert_eq!(m.running()[&slot()].old, mac(1));
    let json = serde_json::to_string(&other).unwrap();
    let back: Failover = serde_json::from_str(&json).unwrap();
    assert_eq!(back, other);
}

#[test]
fn slot_owners_follow_the_assignments_and_say_which_empty_slots_are_wanted() {
    let at = |s: u32| SlotRef {
        cluster: "web".into(),
        slot: s,
    };
    let mut a: imbl::OrdMap<Mac, SlotRef> = imbl::OrdMap::new();
    for s in [0, 2, 3] {
        a.insert(mac(s as u8 + 10), at(s));
    }
    let mut o = SlotOwners::default();
    assert_eq!(o.owner(&a, &at(2)), Some(mac(12)));
    assert_eq!(o.owner(&a, &at(1)), None);
    // Desired 4, three nodes: the empty slot 1 is wanted (the planner will fill it).
    assert!(o.wanted(&a, &at(1), 4));
    // Desired 3 with slot 3 still held above it (say, busy): the count is met, nobody comes for slot 1.
    assert!(!o.wanted(&a, &at(1), 3));
    // A slot with a node is wanted while below the desired count; at or above it, never.
    assert!(o.wanted(&a, &at(2), 3));
    assert!(!o.wanted(&a, &at(3), 3));
    // A change to the assignments is seen (the index is rebuilt), and only then.
    a.insert(mac(11), at(1));
    assert_eq!(o.owner(&a, &at(1)), Some(mac(11)));
    a.remove(&mac(12));
    assert_eq!(o.owner(&a, &at(2)), None);
    assert!(o.wanted(&a, &at(2), 4));
}

#[test]
fn different_nodes_failing_to_come_up_in_one_slot_block_it_for_a_while() {
    let mut b = BootFailures::default();
    let s = slot();
    // The same node failing again counts once; other nodes within the window add up.
    assert!(!b.failed(&s, mac(1), 0, 3));
    assert!(!b.failed(&s, mac(1), 1_000, 3));
    assert!(!b.failed(&s, mac(2), 2_000, 3));
    assert!(!b.is_blocked(&s));
    assert!(b.failed(&s, mac(3), 3_000, 3), "the third node blocks it");
    assert!(b.is_blocked(&s));
    assert!(!b.failed(&s, mac(4), 4_000, 3), "blocked once");
    assert_eq!(b.expire(3_000 + SLOT_BLOCK_MS - 1), Vec::<SlotRef>::new());
    assert_eq!(b.expire(3_000 + SLOT_BLOCK_MS), vec![slot()]);
    assert!(!b.is_blocked(&s));
    // Failures spread wider than the window never add up.
    let mut t = 10 * SLOT_BLOCK_MS;
    for n in 10..20 {
        assert!(!b.failed(&s, mac(n), t, 3));
        t += CHURN_WINDOW_MS / 2 + 1;
    }
    // A reload unblocks everything at once.
    b.failed(&s, mac(30), t, 1);
    assert_eq!(b.clear(), vec![slot()]);
    assert!(!b.is_blocked(&s));
}
