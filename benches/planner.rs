//! Planner scale benchmark (issue 3): 10,000 nodes and 200 clusters planned from scratch, then re-planned
//! after one change (a node fails; a cluster's desired count rises). Goals: full plan < 50 ms, re-plan
//! after one event < 5 ms. Run: `cargo bench --bench planner`. Prints medians of repeated runs.

use corral::mac::Mac;
use corral::policy::plan::{apply, plan, NodeState, State};
use corral::policy::Policy;
use std::path::Path;
use std::time::Instant;

fn mac(i: u32) -> Mac {
    Mac([0x52, 0x54, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8])
}

fn policy_text(clusters: u32) -> String {
    let mut s = String::from("[settings]\ncooldown = \"5m\"\n");
    for c in 0..clusters {
        // Mixed shapes: some need tags or bigger nodes, priorities spread, a third may preempt.
        let req = match c % 4 {
            0 => "requires = { tags = [\"ssd\"] }\n",
            1 => "requires = { min_cpus = 8 }\n",
            _ => "",
        };
        s.push_str(&format!(
            "[[cluster]]\nname = \"c{c}\"\npriority = {}\nmin = 5\nmax = 80\ndefault = 45\npreempt = {}\nimages = [\"img\"]\n{req}",
            c % 10,
            c % 3 == 0
        ));
    }
    s
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    (median(times), last.unwrap())
}

fn main() {
    let (n_nodes, n_clusters) = (10_000u32, 200u32);
    let pol = Policy::parse(
        &policy_text(n_clusters),
        Path::new("bench.toml"),
        &|_, _| true,
    )
    .expect("valid policy");
    let mut st = State::default();
    for i in 0..n_nodes {
        let mut n = NodeState::new(mac(i));
        n.cpus = Some([2, 4, 8, 16][(i % 4) as usize]);
        n.memory = Some(4096 * (1 + (i % 8) as u64));
        if i % 3 == 0 {
            n.tags.insert("ssd".into());
        }
        n.utilisation = (i % 100) as f64 / 100.0;
        st.nodes.insert(n.mac, n);
    }
    let now = 1_795_420_740;
    let (full_ms, actions) = time(7, || plan(&pol, &st, now));
    let settled = apply(&st, &actions, now);
    println!("planner: {n_nodes} nodes, {n_clusters} clusters");
    println!(
        "  full plan from scratch : {full_ms:8.2} ms  ({} actions)   goal < 50 ms",
        actions.len()
    );

    // One event: an assigned node fails.
    let victim = *settled.assignments.keys().next().unwrap();
    let mut failed = settled.clone();
    failed.nodes.get_mut(&victim).unwrap().healthy = false;
    let later = now + 3600;
    let (fail_ms, acts) = time(21, || plan(&pol, &failed, later));
    println!(
        "  re-plan, node failed   : {fail_ms:8.2} ms  ({} actions)   goal < 5 ms",
        acts.len()
    );

    // One event: a cluster's desired count rises (scale target).
    let mut grow = settled.clone();
    grow.scale_targets.insert("c7".into(), 60);
    let (grow_ms, acts) = time(21, || plan(&pol, &grow, later));
    println!(
        "  re-plan, cluster grows : {grow_ms:8.2} ms  ({} actions)   goal < 5 ms",
        acts.len()
    );

    // No change at all.
    let (idle_ms, _) = time(21, || plan(&pol, &settled, later));
    println!("  re-plan, nothing new   : {idle_ms:8.2} ms");

    // The controller copies the fleet to plan it without holding its lock, and readers take snapshots:
    // what one copy costs (and freeing it) is paid on every plan.
    let (clone_ms, copy) = time(21, || settled.clone());
    let (drop_ms, _) = time(21, || drop(copy.clone()));
    println!(
        "  copy of the fleet state : {:8.1} µs  (copy and free: {:.1} µs)",
        clone_ms * 1000.0,
        drop_ms * 1000.0
    );
}
