//! Every deadline in every operation: what it does, one test a row. A
//! deadline belongs to one operation; met in any other (a timer left from
//! an operation that ended) it does nothing.

use super::*;
use crate::inplace::Move;
use crate::operation::fixtures::*;

use Deadline::{AbortGrace, Answers, Exec, Handshake, ProbationEnd, Ready, ServingEnds};
use Expiry::{FailReload, FailUpgrade, KillUpgradeChild, Nothing, Promote, StopServing};
use Summary::{Idle, Reading, Starting};

macro_rules! deadlines {
    ($($name:ident: $state:expr, $deadline:expr => $expected:expr;)*) => {$(
        #[test]
        fn $name() {
            assert_eq!($state.on_deadline($deadline), $expected);
        }
    )*};
}

deadlines! {
    idle_ready_timeout_does_nothing: Idle, Ready => Nothing;
    idle_answers_timeout_does_nothing: Idle, Answers => Nothing;
    idle_probation_end_does_nothing: Idle, ProbationEnd => Nothing;
    idle_handshake_timeout_does_nothing: Idle, Handshake => Nothing;
    idle_exec_time_does_nothing: Idle, Exec => Nothing;
    idle_abort_grace_does_nothing: Idle, AbortGrace => Nothing;
    idle_drain_grace_end_does_nothing: Idle, ServingEnds => Nothing;

    reading_ready_timeout_does_nothing: Reading, Ready => Nothing;
    reading_answers_timeout_does_nothing: Reading, Answers => Nothing;
    reading_probation_end_does_nothing: Reading, ProbationEnd => Nothing;
    reading_handshake_timeout_does_nothing: Reading, Handshake => Nothing;
    reading_exec_time_does_nothing: Reading, Exec => Nothing;
    reading_abort_grace_does_nothing: Reading, AbortGrace => Nothing;
    reading_drain_grace_end_does_nothing: Reading, ServingEnds => Nothing;

    starting_ready_timeout_fails_the_reload: Starting, Ready => FailReload;
    starting_answers_timeout_does_nothing: Starting, Answers => Nothing;
    starting_probation_end_does_nothing: Starting, ProbationEnd => Nothing;
    starting_handshake_timeout_does_nothing: Starting, Handshake => Nothing;
    starting_exec_time_does_nothing: Starting, Exec => Nothing;
    starting_abort_grace_does_nothing: Starting, AbortGrace => Nothing;
    starting_drain_grace_end_does_nothing: Starting, ServingEnds => Nothing;

    preparing_ready_timeout_does_nothing: PREPARING, Ready => Nothing;
    preparing_answers_timeout_aborts: PREPARING, Answers => Expiry::InPlace(Move::AbortLate);
    preparing_probation_end_does_nothing: PREPARING, ProbationEnd => Nothing;
    preparing_handshake_timeout_does_nothing: PREPARING, Handshake => Nothing;
    preparing_exec_time_does_nothing: PREPARING, Exec => Nothing;
    preparing_abort_grace_does_nothing: PREPARING, AbortGrace => Nothing;
    preparing_drain_grace_end_does_nothing: PREPARING, ServingEnds => Nothing;
    committing_ready_timeout_does_nothing: COMMITTING, Ready => Nothing;
    committing_answers_timeout_kills_the_late_and_finishes: COMMITTING, Answers => Expiry::InPlace(Move::KillLateAndFinish);
    committing_probation_end_does_nothing: COMMITTING, ProbationEnd => Nothing;
    committing_handshake_timeout_does_nothing: COMMITTING, Handshake => Nothing;
    committing_exec_time_does_nothing: COMMITTING, Exec => Nothing;
    committing_abort_grace_does_nothing: COMMITTING, AbortGrace => Nothing;
    committing_drain_grace_end_does_nothing: COMMITTING, ServingEnds => Nothing;

    probation_ready_timeout_does_nothing: PROBATION, Ready => Nothing;
    probation_answers_timeout_does_nothing: PROBATION, Answers => Nothing;
    probation_end_promotes: PROBATION, ProbationEnd => Promote;
    probation_handshake_timeout_does_nothing: PROBATION, Handshake => Nothing;
    probation_exec_time_does_nothing: PROBATION, Exec => Nothing;
    probation_abort_grace_does_nothing: PROBATION, AbortGrace => Nothing;
    probation_drain_grace_end_does_nothing: PROBATION, ServingEnds => Nothing;
    canary_end_promotes: CANARY, ProbationEnd => Promote;
    canary_ready_timeout_does_nothing: CANARY, Ready => Nothing;

    upgrading_ready_timeout_does_nothing: UPGRADING, Ready => Nothing;
    upgrading_answers_timeout_does_nothing: UPGRADING, Answers => Nothing;
    upgrading_probation_end_does_nothing: UPGRADING, ProbationEnd => Nothing;
    upgrading_handshake_timeout_fails_the_upgrade: UPGRADING, Handshake => FailUpgrade;
    upgrading_exec_time_execs: UPGRADING, Exec => Expiry::Exec;
    upgrading_abort_grace_kills_the_child: UPGRADING, AbortGrace => KillUpgradeChild;
    upgrading_drain_grace_end_does_nothing: UPGRADING, ServingEnds => Nothing;

    graceful_stop_ready_timeout_does_nothing: GRACEFUL, Ready => Nothing;
    graceful_stop_answers_timeout_does_nothing: GRACEFUL, Answers => Nothing;
    graceful_stop_probation_end_does_not_promote: GRACEFUL, ProbationEnd => Nothing;
    graceful_stop_handshake_timeout_does_nothing: GRACEFUL, Handshake => Nothing;
    graceful_stop_exec_time_does_not_exec: GRACEFUL, Exec => Nothing;
    graceful_stop_abort_grace_kills_the_upgrade_child: GRACEFUL, AbortGrace => KillUpgradeChild;
    drain_grace_end_stops_serving: GRACEFUL, ServingEnds => StopServing;

    fast_stop_ready_timeout_does_nothing: FAST, Ready => Nothing;
    fast_stop_answers_timeout_does_nothing: FAST, Answers => Nothing;
    fast_stop_probation_end_does_not_promote: FAST, ProbationEnd => Nothing;
    fast_stop_handshake_timeout_does_nothing: FAST, Handshake => Nothing;
    fast_stop_exec_time_does_not_exec: FAST, Exec => Nothing;
    fast_stop_abort_grace_kills_the_upgrade_child: FAST, AbortGrace => KillUpgradeChild;
    fast_stop_drain_grace_end_does_nothing: FAST, ServingEnds => Nothing;
}
