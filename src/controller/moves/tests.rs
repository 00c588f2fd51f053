use super::*;

fn spec(agent: bool, power: bool) -> MoveSpec {
    MoveSpec {
        agent,
        power,
        to_role: true,
        grace_ms: 10_000,
        off_timeout_ms: 20_000,
        boot_timeout_ms: 60_000,
    }
}

fn kinds(out: &[Output]) -> Vec<String> {
    out.iter()
        .map(|o| match o {
            Output::Order(k) => format!("order:{}", k.name()),
            Output::Power(c) => format!("power:{c:?}"),
            Output::Fence => "fence".into(),
            Output::Event { kind, .. } => kind.to_string(),
            Output::Finished { ok, .. } => format!("finished:{ok}"),
        })
        .collect()
}

fn off() -> Input {
    Input::Power {
        call: Call::Status,
        result: Ok(Some(PowerState::Off)),
    }
}

fn done(call: Call) -> Input {
    Input::Power {
        call,
        result: Ok(None),
    }
}

#[test]
fn the_whole_move_with_agent_and_bmc() {
    let (mut m, out) = Move::start(spec(true, true), 0);
    assert_eq!(kinds(&out), ["order:drain"]);
    let out = m.on(
        Input::Acked {
            ok: true,
            detail: "stopped".into(),
        },
        1_500,
    );
    assert_eq!(kinds(&out), ["move-drain", "order:poweroff"]);
    assert!(matches!(out[0], Output::Event { secs, .. } if secs == 1.5));
    // Polls status; one call at a time.
    assert_eq!(kinds(&m.on(Input::Tick, 1_700)), ["power:Status"]);
    assert!(m.on(Input::Tick, 1_800).is_empty());
    let on = Input::Power {
        call: Call::Status,
        result: Ok(Some(PowerState::On)),
    };
    assert!(m.on(on, 1_900).is_empty());
    assert_eq!(kinds(&m.on(Input::Tick, 2_000)), ["power:Status"]);
    let out = m.on(off(), 2_600);
    assert_eq!(
        kinds(&out),
        ["move-power-off", "fence", "power:BootNetwork"]
    );
    assert_eq!(
        kinds(&m.on(done(Call::BootNetwork), 2_650)),
        ["move-reset", "power:On"]
    );
    assert_eq!(kinds(&m.on(done(Call::On), 2_700)), ["move-power-on"]);
    assert_eq!(m.step(), Step::Confirming);
    // Nothing before the node shows up.
    assert!(m.on(Input::Tick, 10_000).is_empty());
    let out = m.on(Input::NewRoleHeartbeat, 20_700);
    assert_eq!(kinds(&out), ["move-confirmed", "finished:true"]);
    assert!(matches!(out[0], Output::Event { secs, .. } if secs == 18.0));
    assert!(m.on(Input::Tick, 99_999).is_empty(), "done means done");
}

#[test]
fn a_slow_agent_then_a_node_that_will_not_power_off() {
    let (mut m, _) = Move::start(spec(true, true), 0);
    // No ack: the drain gives up after grace + slack.
    assert!(m.on(Input::Tick, 14_999).is_empty());
    assert_eq!(
        kinds(&m.on(Input::Tick, 15_000)),
        ["move-drain-failed", "order:poweroff"]
    );
    // Never off: hard off at the timeout.
    let _ = m.on(Input::Tick, 15_100);
    let _ = m.on(
        Input::Power {
            call: Call::Status,
            result: Ok(Some(PowerState::On)),
        },
        15_200,
    );
    assert_eq!(
        kinds(&m.on(Input::Tick, 35_000)),
        ["move-hard-off", "power:Off { hard: true }"]
    );
    let _ = m.on(done(Call::Off { hard: true }), 35_100);
    // Still not off 30 s later: the move fails.
    let _ = m.on(Input::Tick, 35_200);
    let out = m.on(Input::Tick, 65_000);
    assert!(
        kinds(&out).contains(&"finished:false".to_string()),
        "{out:?}"
    );
}

#[test]
fn without_an_agent_the_bmc_does_it_and_a_refused_soft_off_goes_hard() {
    let (mut m, out) = Move::start(spec(false, true), 0);
    assert_eq!(kinds(&out), ["move-drain", "power:Off { hard: false }"]);
    let out = m.on(
        Input::Power {
            call: Call::Off { hard: false },
            result: Err("not supported".into()),
        },
        100,
    );
    assert_eq!(kinds(&out), ["power:Off { hard: true }"]);
    let _ = m.on(done(Call::Off { hard: true }), 200);
    let _ = m.on(Input::Tick, 300);
    let out = m.on(off(), 400);
    assert!(matches!(&out[0], Output::Event { message, .. } if message.contains("cut hard")));
}

#[test]
fn agent_only_nodes_reboot_and_nodes_with_neither_cannot_move() {
    let (mut m, _) = Move::start(spec(true, false), 0);
    let out = m.on(
        Input::Acked {
            ok: true,
            detail: String::new(),
        },
        100,
    );
    assert_eq!(
        kinds(&out),
        ["move-drain", "fence", "move-reset", "order:reboot"]
    );
    assert_eq!(m.step(), Step::Confirming);
    let (m, out) = Move::start(spec(false, false), 0);
    assert_eq!(kinds(&out), ["finished:false"]);
    assert_eq!(m.step(), Step::Done);
}

#[test]
fn a_switch_that_cannot_tell_takes_the_agents_word_after_a_while() {
    let (mut m, _) = Move::start(spec(true, true), 0);
    let ack = || Input::Acked {
        ok: true,
        detail: String::new(),
    };
    let _ = m.on(ack(), 100);
    let unknown = || Input::Power {
        call: Call::Status,
        result: Ok(Some(PowerState::Unknown)),
    };
    // Not acknowledged yet: unknown stays unknown.
    let _ = m.on(Input::Tick, 200);
    assert!(m.on(unknown(), 300).is_empty());
    let _ = m.on(ack(), 1_000);
    let _ = m.on(Input::Tick, 2_000);
    assert!(m.on(unknown(), 2_100).is_empty());
    let _ = m.on(Input::Tick, 6_000);
    let out = m.on(unknown(), 6_100);
    assert_eq!(
        kinds(&out),
        ["move-power-off", "fence", "power:BootNetwork"]
    );
}

#[test]
fn a_node_that_never_comes_back_fails_and_is_cut_off() {
    let (mut m, _) = Move::start(spec(false, true), 0);
    let _ = m.on(done(Call::Off { hard: false }), 10);
    let _ = m.on(Input::Tick, 20);
    let _ = m.on(off(), 30);
    let _ = m.on(done(Call::BootNetwork), 40);
    let _ = m.on(done(Call::On), 50);
    assert!(m.on(Input::Tick, 60_049).is_empty());
    let out = m.on(Input::Tick, 60_050);
    assert_eq!(
        kinds(&out),
        ["move-failed", "power:Off { hard: true }", "finished:false"]
    );
}

#[test]
fn power_on_failure_fails_the_move_and_pool_moves_confirm_when_parked() {
    let (mut m, _) = Move::start(spec(false, true), 0);
    let _ = m.on(done(Call::Off { hard: false }), 10);
    let _ = m.on(Input::Tick, 20);
    let _ = m.on(off(), 30);
    let _ = m.on(done(Call::BootNetwork), 40);
    let out = m.on(
        Input::Power {
            call: Call::On,
            result: Err("qmp: connection refused".into()),
        },
        50,
    );
    assert_eq!(kinds(&out), ["move-failed", "finished:false"]);

    // Back to the pool: switched off and on, then confirmed by a parked request, or, for a node the
    // planner gave a role meanwhile, by a heartbeat in it.
    let to_pool = || {
        let mut s = spec(false, true);
        s.to_role = false;
        let (mut m, _) = Move::start(s, 0);
        let _ = m.on(done(Call::Off { hard: false }), 10);
        let _ = m.on(Input::Tick, 20);
        let _ = m.on(off(), 30);
        let _ = m.on(done(Call::BootNetwork), 40);
        let _ = m.on(done(Call::On), 50);
        m
    };
    for confirmation in [Input::Parked, Input::NewRoleHeartbeat] {
        assert_eq!(
            kinds(&to_pool().on(confirmation, 70)),
            ["move-confirmed", "finished:true"]
        );
    }
}
