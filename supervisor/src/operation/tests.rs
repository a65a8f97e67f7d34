//! Every request in every operation: the admission table, one test a row;
//! then the follow-up that coalesces requests; a worker's exit in every
//! state of every operation, the second table; the in-place decisions, the
//! crash-loop breaker, the respawn backoff and the drain cap. No process,
//! no socket, no sleep.

use super::fixtures::*;
use super::*;
use crate::fleet::over_drain_cap;
use crate::fleet::{crash_loop, crashes_in_a_row, respawn_delay, GenerationState};
use crate::inplace::{answer_verdict, next_move, Answer, Move};
use crate::operation::exit_reason;
use crate::reload::Phase;
use crate::worker::State;
use baton_wire::protocol::WorkerMessage;
use std::collections::VecDeque;
use tokio::sync::oneshot;
use tokio::time::Instant;

const SERVING: Facts = Facts {
    serving: true,
    spawns_pending: false,
};

fn refused(reason: Refusal) -> Admission {
    Admission::Refuse(reason)
}

macro_rules! admission {
    ($($name:ident: $state:expr, $ask:expr => $expected:expr;)*) => {$(
        #[test]
        fn $name() {
            assert_eq!($state.admit($ask, SERVING), $expected);
        }
    )*};
}

use Admission::{Already, Coalesce, Start};
use Ask::{Promote, Reload, Rollback, Scale, Upgrade};
use Summary::{Idle, Reading, Starting};
const STOP: Ask = Ask::Stop(Stop::Graceful);
const STOP_FAST: Ask = Ask::Stop(Stop::Fast);

admission! {
    idle_reload_starts: Idle, Reload => Start;
    idle_upgrade_starts: Idle, Upgrade => Start;
    idle_scale_starts: Idle, Scale => Start;
    idle_stop_starts: Idle, STOP => Start;
    idle_fast_stop_starts: Idle, STOP_FAST => Start;
    idle_promote_is_refused: Idle, Promote => refused(Refusal::NotOnProbation);
    idle_rollback_is_refused: Idle, Rollback => refused(Refusal::NotOnProbation);

    reading_reload_coalesces: Reading, Reload => Coalesce;
    reading_upgrade_is_refused: Reading, Upgrade => refused(Refusal::ReloadForUpgrade);
    reading_scale_is_refused: Reading, Scale => refused(Refusal::ReloadForScale);
    reading_stop_starts: Reading, STOP => Start;
    reading_fast_stop_starts: Reading, STOP_FAST => Start;
    reading_promote_is_refused: Reading, Promote => refused(Refusal::NotOnProbation);
    reading_rollback_is_refused: Reading, Rollback => refused(Refusal::NotOnProbation);

    starting_reload_coalesces: Starting, Reload => Coalesce;
    starting_upgrade_is_refused: Starting, Upgrade => refused(Refusal::ReloadForUpgrade);
    starting_scale_is_refused: Starting, Scale => refused(Refusal::ReloadForScale);
    starting_stop_starts: Starting, STOP => Start;
    starting_fast_stop_starts: Starting, STOP_FAST => Start;
    starting_promote_is_refused: Starting, Promote => refused(Refusal::NotOnProbation);
    starting_rollback_is_refused: Starting, Rollback => refused(Refusal::NotOnProbation);

    in_place_reload_coalesces: PREPARING, Reload => Coalesce;
    in_place_upgrade_is_refused: PREPARING, Upgrade => refused(Refusal::ReloadForUpgrade);
    in_place_scale_starts_held_workers: PREPARING, Scale => Start;
    in_place_stop_starts: PREPARING, STOP => Start;
    in_place_fast_stop_starts: PREPARING, STOP_FAST => Start;
    in_place_promote_is_refused: PREPARING, Promote => refused(Refusal::NotOnProbation);
    in_place_rollback_is_refused: PREPARING, Rollback => refused(Refusal::NotOnProbation);
    in_place_committing_reload_coalesces: COMMITTING, Reload => Coalesce;
    in_place_committing_upgrade_is_refused: COMMITTING, Upgrade => refused(Refusal::ReloadForUpgrade);
    in_place_committing_scale_starts_held_workers: COMMITTING, Scale => Start;

    probation_reload_coalesces: PROBATION, Reload => Coalesce;
    probation_upgrade_is_refused_with_what_to_do: PROBATION, Upgrade => refused(Refusal::OnProbation {
        generation: 3,
        standby: 2,
        left: Some(Duration::from_secs(30)),
    });
    probation_scale_starts: PROBATION, Scale => Start;
    probation_stop_starts: PROBATION, STOP => Start;
    probation_fast_stop_starts: PROBATION, STOP_FAST => Start;
    probation_promote_starts: PROBATION, Promote => Start;
    probation_rollback_starts: PROBATION, Rollback => Start;

    canary_reload_coalesces: CANARY, Reload => Coalesce;
    canary_promote_starts: CANARY, Promote => Start;
    canary_rollback_starts: CANARY, Rollback => Start;
    canary_upgrade_is_refused_until_promoted: CANARY, Upgrade => refused(Refusal::OnProbation {
        generation: 3,
        standby: 2,
        left: None,
    });

    upgrading_reload_is_refused: UPGRADING, Reload => refused(Refusal::Upgrading);
    upgrading_upgrade_is_refused: UPGRADING, Upgrade => refused(Refusal::AlreadyUpgrading {
        child: 4242,
        elapsed: Duration::from_secs(2),
    });
    upgrading_scale_starts: UPGRADING, Scale => Start;
    upgrading_stop_starts: UPGRADING, STOP => Start;
    upgrading_fast_stop_starts: UPGRADING, STOP_FAST => Start;
    upgrading_promote_is_refused: UPGRADING, Promote => refused(Refusal::NotOnProbation);
    upgrading_rollback_is_refused: UPGRADING, Rollback => refused(Refusal::NotOnProbation);

    graceful_stop_reload_is_refused: GRACEFUL, Reload => refused(Refusal::Stopping);
    graceful_stop_upgrade_is_refused: GRACEFUL, Upgrade => refused(Refusal::Stopping);
    graceful_stop_scale_is_refused: GRACEFUL, Scale => refused(Refusal::Stopping);
    graceful_stop_again_is_already: GRACEFUL, STOP => Already;
    graceful_stop_then_fast_starts: GRACEFUL, STOP_FAST => Start;
    graceful_stop_promote_is_refused: GRACEFUL, Promote => refused(Refusal::NotOnProbation);
    graceful_stop_rollback_is_refused: GRACEFUL, Rollback => refused(Refusal::NotOnProbation);

    fast_stop_reload_is_refused: FAST, Reload => refused(Refusal::Stopping);
    fast_stop_upgrade_is_refused: FAST, Upgrade => refused(Refusal::Stopping);
    fast_stop_scale_is_refused: FAST, Scale => refused(Refusal::Stopping);
    fast_stop_then_graceful_is_already: FAST, STOP => Already;
    fast_stop_again_is_already: FAST, STOP_FAST => Already;
    fast_stop_promote_is_refused: FAST, Promote => refused(Refusal::NotOnProbation);
    fast_stop_rollback_is_refused: FAST, Rollback => refused(Refusal::NotOnProbation);
}

#[test]
fn an_upgrade_before_any_generation_serves_is_refused() {
    let facts = Facts {
        serving: false,
        spawns_pending: false,
    };
    assert_eq!(Idle.admit(Upgrade, facts), refused(Refusal::NotServing));
}

#[test]
fn an_upgrade_while_a_failed_reloads_workers_start_is_refused() {
    let facts = Facts {
        serving: true,
        spawns_pending: true,
    };
    assert_eq!(Idle.admit(Upgrade, facts), refused(Refusal::SpawnsPending));
}

#[test]
fn refusals_say_what_to_do() {
    let text = Refusal::OnProbation {
        generation: 3,
        standby: 2,
        left: Some(Duration::from_secs(12)),
    }
    .to_string();
    assert!(text.contains("generation 3 is on probation (12s left, generation 2 on standby)"));
    assert!(text.contains("baton promote"));
    let canary = Refusal::OnProbation {
        generation: 3,
        standby: 2,
        left: None,
    };
    assert!(canary.to_string().contains("until promoted"));
    assert_eq!(
        Refusal::ReloadForScale.to_string(),
        "a reload is in progress; scale once it has finished"
    );
}

#[test]
fn an_idle_operation_summarises_as_idle_and_ends_nothing() {
    let mut operation = Operation::Idle;
    assert_eq!(operation.summary(), Idle);
    assert!(operation.take_reload().is_none());
    assert!(operation.take_upgrade().is_none());
    assert!(operation.stopping().is_none());
}

#[test]
fn a_stop_keeps_what_it_was_asked_as() {
    let mut operation = Operation::Idle;
    operation.become_stopping(Stop::Graceful, None);
    assert_eq!(operation.stopping(), Some(Stop::Graceful));
    assert_eq!(operation.summary(), GRACEFUL);
    operation.become_stopping(Stop::Fast, None);
    assert_eq!(operation.summary(), FAST);
    assert!(operation.upgrade().is_none());
}

#[test]
fn a_drain_serves_until_its_grace_ends_then_stops_serving() {
    let now = tokio::time::Instant::now();
    let until = now + Duration::from_secs(2);
    let mut operation = Operation::Idle;
    operation.become_stopping(Stop::Graceful, Some(until));
    assert_eq!(operation.summary(), GRACEFUL);
    assert_eq!(operation.serving_until(), Some(until));
    assert_eq!(operation.wakeup(), Some(until));
    assert_eq!(operation.due(now, false), None);
    assert_eq!(operation.due(until, false), Some(Deadline::ServingEnds));
    operation.stop_serving();
    assert_eq!(operation.serving_until(), None);
    assert_eq!(operation.wakeup(), None);
    assert_eq!(operation.due(until, false), None);
    // A fast stop during the grace ends it.
    operation.become_stopping(Stop::Graceful, Some(until));
    operation.become_stopping(Stop::Fast, None);
    assert_eq!(operation.serving_until(), None);
}

fn requester(name: &str) -> Requester {
    Requester {
        command: Some(name.into()),
        ..Requester::control(None, 0)
    }
}

fn waiter() -> (Waiter, oneshot::Receiver<crate::control::protocol::Reply>) {
    oneshot::channel()
}

#[test]
fn requests_during_probation_become_one_follow_up_that_answers_every_waiter() {
    let mut follow_up = FollowUp::default();
    let mut answers = Vec::new();
    for name in ["first", "second", "third"] {
        let (tx, rx) = waiter();
        answers.push(rx);
        let mut request = ReloadRequest::new(Trigger::Cli, Some(requester(name)));
        request.waiters.push(tx);
        follow_up.absorb(request);
    }
    // A HUP coalesced too: no waiter, no change of requester.
    follow_up.absorb(ReloadRequest::new(Trigger::Signal, None));
    let request = follow_up.take().expect("one follow-up");
    assert!(!follow_up.is_pending());
    assert_eq!(request.trigger, Trigger::Coalesced);
    assert_eq!(request.waiters.len(), 3);
    assert_eq!(request.requested_by, Some(requester("third")));
    for waiter in request.waiters {
        let _ = waiter.send(crate::control::protocol::Reply::error("done"));
    }
    for mut answer in answers {
        assert!(
            answer.try_recv().is_ok(),
            "every waiter hears the follow-up"
        );
    }
}

#[test]
fn a_follow_up_keeps_the_canary_and_mode_asked_for() {
    let mut follow_up = FollowUp::default();
    let mut canary = ReloadRequest::new(Trigger::Cli, None);
    canary.canary = Some(Share::parse("10%").unwrap());
    canary.mode = Mode::NewGeneration;
    follow_up.absorb(canary);
    follow_up.absorb(ReloadRequest::new(Trigger::Signal, None));
    let request = follow_up.take().unwrap();
    assert_eq!(request.canary, Some(Share::parse("10%").unwrap()));
    assert_eq!(request.mode, Mode::NewGeneration);
}

#[test]
fn a_later_mode_replaces_an_earlier_one() {
    let mut follow_up = FollowUp::default();
    for mode in [Mode::InPlace, Mode::NewGeneration] {
        let mut request = ReloadRequest::new(Trigger::Cli, None);
        request.mode = mode;
        follow_up.absorb(request);
    }
    assert_eq!(follow_up.take().unwrap().mode, Mode::NewGeneration);
}

#[test]
fn a_cancelled_follow_up_tells_its_waiters_why() {
    let mut follow_up = FollowUp::default();
    let (tx, mut rx) = waiter();
    let mut request = ReloadRequest::new(Trigger::Cli, None);
    request.waiters.push(tx);
    follow_up.absorb(request);
    follow_up.cancel("the master is stopping");
    assert!(!follow_up.is_pending());
    let reply = serde_json::to_string(&rx.try_recv().unwrap()).unwrap();
    assert!(
        reply.contains("reload refused: the master is stopping"),
        "{reply}"
    );
}

#[test]
fn no_follow_up_without_requests() {
    let mut follow_up = FollowUp::default();
    assert!(!follow_up.is_pending());
    assert!(follow_up.take().is_none());
    follow_up.cancel("nothing");
}

/// A serving worker that died: in its generation's place, within the
/// worker count, owing nothing, its breaker not tripped.
const DIED: Exited = Exited {
    generation: GenerationState::Current,
    draining: false,
    within: true,
    owed_answer: false,
    crash_loop: false,
};
/// Told to drain (replaced, scaled down, stopping) or killed.
const DRAINED: Exited = Exited {
    draining: true,
    ..DIED
};
/// Its breaker trips with this crash.
const LOOPING: Exited = Exited {
    crash_loop: true,
    ..DIED
};
/// Beyond the worker count after `baton scale` down.
const SURPLUS: Exited = Exited {
    within: false,
    ..DIED
};
/// It owed the in-place reload its answer.
const OWED: Exited = Exited {
    owed_answer: true,
    ..DIED
};

macro_rules! worker_exits {
    ($($name:ident: $operation:expr, $generation:ident, $worker:expr => $to_operation:ident, $to_worker:ident;)*) => {$(
        #[test]
        fn $name() {
            let exited = Exited {
                generation: GenerationState::$generation,
                ..$worker
            };
            let expected = Reaction {
                operation: ForOperation::$to_operation,
                worker: ForWorker::$to_worker,
            };
            assert_eq!($operation.on_worker_exit(exited), expected);
        }
    )*};
}

worker_exits! {
    idle_a_serving_worker_that_dies_is_respawned: Idle, Current, DIED => Nothing, Respawn;
    idle_a_serving_worker_that_dies_once_too_often_is_not_respawned_any_more: Idle, Current, LOOPING => Nothing, StopRespawning;
    idle_a_serving_worker_scaled_down_is_not_replaced: Idle, Current, DRAINED => Nothing, Forget;
    idle_a_surplus_worker_after_scale_down_is_not_replaced: Idle, Current, SURPLUS => Nothing, Forget;
    idle_a_drained_worker_of_a_replaced_generation_is_forgotten: Idle, Draining, DRAINED => Nothing, Forget;
    idle_a_worker_of_a_generation_still_handing_over_is_forgotten: Idle, Draining, DIED => Nothing, Forget;
    idle_a_worker_of_a_failed_generation_is_forgotten: Idle, Failed, DRAINED => Nothing, Forget;

    reading_a_serving_worker_that_dies_is_respawned: Reading, Current, DIED => Nothing, Respawn;
    reading_a_crash_looping_serving_worker_is_not_respawned_any_more: Reading, Current, LOOPING => Nothing, StopRespawning;
    reading_a_drained_worker_of_a_replaced_generation_is_forgotten: Reading, Draining, DRAINED => Nothing, Forget;

    starting_a_new_worker_that_exits_before_it_is_ready_fails_the_reload: Starting, Starting, DIED => FailReload, Forget;
    starting_a_new_worker_is_never_respawned_even_within_its_breaker: Starting, Starting, LOOPING => FailReload, Forget;
    starting_a_worker_of_the_serving_generation_that_dies_is_respawned: Starting, Current, DIED => Nothing, Respawn;
    starting_a_crash_looping_worker_of_the_serving_generation_is_not_respawned_any_more: Starting, Current, LOOPING => Nothing, StopRespawning;
    starting_a_serving_worker_scaled_down_is_not_replaced: Starting, Current, DRAINED => Nothing, Forget;
    starting_a_drained_worker_of_a_replaced_generation_is_forgotten: Starting, Draining, DRAINED => Nothing, Forget;
    starting_a_worker_of_an_earlier_failed_generation_is_forgotten: Starting, Failed, DRAINED => Nothing, Forget;

    in_place_preparing_a_worker_that_owed_its_answer_aborts_and_is_respawned: PREPARING, Current, OWED => AbortInPlace, Respawn;
    in_place_preparing_a_crash_looping_worker_that_owed_its_answer_aborts_and_is_not_respawned: PREPARING, Current, Exited { crash_loop: true, ..OWED } => AbortInPlace, StopRespawning;
    in_place_preparing_a_worker_scaled_down_before_it_answered_aborts: PREPARING, Current, Exited { draining: true, ..OWED } => AbortInPlace, Forget;
    in_place_preparing_a_worker_that_prepared_already_is_respawned_without_aborting: PREPARING, Current, DIED => Nothing, Respawn;
    in_place_preparing_a_worker_drained_before_it_began_is_forgotten: PREPARING, Current, DRAINED => Nothing, Forget;
    in_place_preparing_a_drained_worker_of_a_replaced_generation_is_forgotten: PREPARING, Draining, DRAINED => Nothing, Forget;

    in_place_committing_a_worker_that_owed_its_answer_is_awaited_no_more_and_respawned: COMMITTING, Current, OWED => StopWaiting, Respawn;
    in_place_committing_a_crash_looping_worker_that_owed_its_answer_is_not_respawned: COMMITTING, Current, Exited { crash_loop: true, ..OWED } => StopWaiting, StopRespawning;
    in_place_committing_a_worker_that_committed_already_is_respawned: COMMITTING, Current, DIED => Nothing, Respawn;
    in_place_committing_a_drained_worker_of_a_replaced_generation_is_forgotten: COMMITTING, Draining, DRAINED => Nothing, Forget;

    probation_a_new_worker_that_exits_rolls_back: PROBATION, Current, DIED => RollBack, Forget;
    probation_a_crash_looping_new_worker_rolls_back_and_is_not_respawned: PROBATION, Current, LOOPING => RollBack, Forget;
    probation_a_new_worker_scaled_down_is_not_replaced_and_does_not_roll_back: PROBATION, Current, DRAINED => Nothing, Forget;
    probation_a_standby_worker_that_dies_is_not_replaced: PROBATION, Standby, DIED => Nothing, Forget;
    probation_a_drained_worker_of_an_older_generation_is_forgotten: PROBATION, Draining, DRAINED => Nothing, Forget;
    probation_a_worker_of_a_failed_generation_is_forgotten: PROBATION, Failed, DRAINED => Nothing, Forget;

    canary_a_new_worker_that_exits_rolls_back: CANARY, Current, DIED => RollBack, Forget;
    canary_a_standby_worker_that_dies_is_not_replaced: CANARY, Standby, DIED => Nothing, Forget;
    canary_a_drained_worker_of_an_older_generation_is_forgotten: CANARY, Draining, DRAINED => Nothing, Forget;

    upgrading_a_serving_worker_that_dies_is_respawned: UPGRADING, Current, DIED => Nothing, Respawn;
    upgrading_a_crash_looping_serving_worker_is_not_respawned_any_more: UPGRADING, Current, LOOPING => Nothing, StopRespawning;
    upgrading_a_drained_worker_of_a_replaced_generation_is_forgotten: UPGRADING, Draining, DRAINED => Nothing, Forget;

    graceful_stop_a_drained_worker_is_forgotten: GRACEFUL, Draining, DRAINED => Nothing, Forget;
    graceful_stop_a_worker_of_the_abandoned_new_generation_is_forgotten: GRACEFUL, Failed, DRAINED => Nothing, Forget;
    stopping_never_respawns_even_a_serving_worker_not_told_to_drain: GRACEFUL, Current, DIED => Nothing, Forget;

    fast_stop_a_terminated_serving_worker_is_not_replaced: FAST, Current, DRAINED => Nothing, Forget;
    fast_stop_a_worker_of_the_abandoned_new_generation_fails_nothing: FAST, Starting, DRAINED => Nothing, Forget;
    fast_stop_a_terminated_standby_worker_is_forgotten: FAST, Standby, DRAINED => Nothing, Forget;
}

#[test]
fn exit_reasons_name_what_happened() {
    let draining = State::Draining {
        kill_at: Instant::now(),
    };
    assert_eq!(
        exit_reason(GenerationState::Starting, State::Ready, true),
        "failed_start"
    );
    assert_eq!(
        exit_reason(GenerationState::Current, State::Killed, false),
        "killed"
    );
    assert_eq!(
        exit_reason(GenerationState::Draining, draining, true),
        "drained"
    );
    assert_eq!(
        exit_reason(GenerationState::Current, State::Ready, true),
        "exited"
    );
    assert_eq!(
        exit_reason(GenerationState::Current, State::Ready, false),
        "crashed"
    );
}

fn prepared(version: &str) -> WorkerMessage {
    WorkerMessage::AppPrepared {
        version: version.into(),
    }
}

fn refusal(version: &str) -> WorkerMessage {
    WorkerMessage::AppRefused {
        version: version.into(),
        reason: "bad".into(),
    }
}

fn committed(version: &str) -> WorkerMessage {
    WorkerMessage::AppCommitted {
        version: version.into(),
    }
}

macro_rules! answers {
    ($($name:ident: $phase:expr, $answer:expr => $expected:expr;)*) => {$(
        #[test]
        fn $name() {
            assert_eq!(answer_verdict($phase, &$answer, "v2"), $expected);
        }
    )*};
}

answers! {
    in_place_prepared_while_preparing_counts: Phase::Prepare, prepared("v2") => Answer::Prepared;
    in_place_refusal_while_preparing_aborts: Phase::Prepare, refusal("v2") => Answer::Abort;
    in_place_commit_while_preparing_is_ignored: Phase::Prepare, committed("v2") => Answer::Ignore;
    in_place_prepared_for_another_version_is_ignored: Phase::Prepare, prepared("v1") => Answer::Ignore;
    in_place_refusal_for_another_version_is_ignored: Phase::Prepare, refusal("v1") => Answer::Ignore;
    in_place_committed_while_committing_counts: Phase::Commit, committed("v2") => Answer::Committed;
    in_place_refusal_while_committing_kills_the_worker: Phase::Commit, refusal("v2") => Answer::Kill;
    in_place_prepared_while_committing_is_ignored: Phase::Commit, prepared("v2") => Answer::Ignore;
    in_place_committed_for_another_version_is_ignored: Phase::Commit, committed("v1") => Answer::Ignore;
    in_place_ready_is_no_answer: Phase::Prepare, WorkerMessage::Ready => Answer::Ignore;
}

macro_rules! moves {
    ($($name:ident: $phase:expr, answered $all:expr, late $late:expr => $expected:expr;)*) => {$(
        #[test]
        fn $name() {
            assert_eq!(next_move($phase, $all, $late), $expected);
        }
    )*};
}

moves! {
    in_place_all_prepared_commits: Phase::Prepare, answered true, late false => Move::Commit;
    in_place_all_prepared_at_the_deadline_still_commits: Phase::Prepare, answered true, late true => Move::Commit;
    in_place_prepare_timeout_aborts: Phase::Prepare, answered false, late true => Move::AbortLate;
    in_place_preparing_waits: Phase::Prepare, answered false, late false => Move::Wait;
    in_place_all_committed_finishes: Phase::Commit, answered true, late false => Move::Finish;
    in_place_commit_timeout_kills_the_late_and_finishes: Phase::Commit, answered false, late true => Move::KillLateAndFinish;
    in_place_committing_waits: Phase::Commit, answered false, late false => Move::Wait;
}

#[test]
fn the_crash_loop_breaker_trips_at_the_limit_within_the_window() {
    let start = Instant::now();
    let window = Duration::from_secs(60);
    let mut times = VecDeque::new();
    for n in 0..4 {
        assert!(!crash_loop(
            &mut times,
            start + Duration::from_secs(n),
            window,
            5
        ));
    }
    assert!(crash_loop(
        &mut times,
        start + Duration::from_secs(4),
        window,
        5
    ));
}

#[test]
fn crashes_spread_wider_than_the_window_never_trip_the_breaker() {
    let start = Instant::now();
    let window = Duration::from_secs(10);
    let mut times = VecDeque::new();
    for n in 0..20 {
        let at = start + Duration::from_secs(11 * n);
        assert!(!crash_loop(&mut times, at, window, 3), "crash {n}");
    }
    assert_eq!(times.len(), 1);
}

#[test]
fn respawn_backoff_doubles_from_100ms_and_caps_at_10s() {
    let delays: Vec<u64> = (1..=9)
        .map(|c| respawn_delay(c).as_millis() as u64)
        .collect();
    assert_eq!(
        delays,
        [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
    );
    assert_eq!(respawn_delay(1000), Duration::from_secs(10));
}

#[test]
fn a_worker_that_ran_healthy_starts_a_new_crash_count() {
    assert_eq!(crashes_in_a_row(Duration::from_secs(11), 7), 1);
    assert_eq!(crashes_in_a_row(Duration::from_millis(50), 7), 8);
    assert_eq!(crashes_in_a_row(Duration::ZERO, 0), 1);
}

#[test]
fn the_drain_cap_kills_the_oldest_draining_generations() {
    assert_eq!(over_drain_cap(&[3, 5, 8, 9], 2), &[3, 5]);
    assert_eq!(over_drain_cap(&[3, 5], 2), &[] as &[u64]);
    assert_eq!(over_drain_cap(&[], 0), &[] as &[u64]);
    assert_eq!(over_drain_cap(&[4], 0), &[4]);
}
