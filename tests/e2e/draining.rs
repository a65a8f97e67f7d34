//! Draining generations do not linger or pile up: one with no live worker
//! is finished at commit, and past `max_draining_generations` the oldest is
//! killed.

use baton_tests::harness::{
    config_with_worker, event_name, field, generation_in, hello_config, wrapped_worker, Baton,
};
use std::time::Duration;

#[test]
fn a_replaced_generation_without_a_live_worker_finishes_at_commit() {
    // Ready after 50 ms, dead after 200: it crash-loops with a growing
    // backoff once generation 1 is current.
    let mut baton = Baton::start(&config_with_worker(
        "command = [\"/bin/sh\", \"-c\", \"sleep 0.2\"]\nprotocol = \"systemd\"\nready = \"delay:50ms\"\n",
    ));
    baton.wait_committed(1);
    // Wait for a respawn far enough away that the reload commits first.
    baton.wait_event(Duration::from_secs(10), |e| {
        event_name(e) == "worker.respawning"
            && field(e, "delay_ms").parse::<u64>().unwrap_or(0) >= 800
    });
    baton.write_config(&hello_config(1));
    let outcome = baton.reload();
    assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    let finished = baton.wait_generation_finished(1);
    assert_eq!(field(&finished, "state"), "draining", "{finished}");
    assert!(generation_in(&baton.status(), 1).is_none());
}

#[test]
fn past_max_draining_generations_the_oldest_is_killed() {
    let config = config_with_worker(&wrapped_worker(
        &["--ignore-term"],
        "drain_timeout = \"60s\"\n",
    ))
    .replace(
        "[supervisor]\n",
        "[supervisor]\nmax_draining_generations = 2\n",
    );
    let mut baton = Baton::start(&config);
    baton.wait_committed(1);
    for _ in 0..5 {
        let outcome = baton.reload();
        assert_eq!(event_name(&outcome), "reload.committed", "{outcome}");
    }
    // Generations 1 to 3 were killed, one per reload past the second.
    for generation in 1..=3 {
        baton.wait_generation_finished(generation);
    }
    let killed = baton.count_events(|e| event_name(e) == "generation.killed_over_cap");
    assert_eq!(killed, 3);
    let status = baton.status();
    let numbers: Vec<u64> = status["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [4, 5, 6], "two draining and the current: {status}");
}
