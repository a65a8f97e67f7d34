//! The operations the decision tables try, as their summaries: shared by
//! every table's tests.

use super::Summary;
use crate::master::Stop;
use crate::reload::Phase;
use std::time::Duration;

pub const PROBATION: Summary = Summary::Probation {
    generation: 3,
    standby: 2,
    left: Some(Duration::from_secs(30)),
};
pub const CANARY: Summary = Summary::Probation {
    generation: 3,
    standby: 2,
    left: None,
};
pub const UPGRADING: Summary = Summary::Upgrading {
    child: 4242,
    elapsed: Duration::from_secs(2),
};
pub const PREPARING: Summary = Summary::InPlace(Phase::Prepare);
pub const COMMITTING: Summary = Summary::InPlace(Phase::Commit);
pub const GRACEFUL: Summary = Summary::Stopping(Stop::Graceful);
pub const FAST: Summary = Summary::Stopping(Stop::Fast);
