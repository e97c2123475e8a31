//! Sans-I/O core of the relay daemon.
//!
//! Will hold the probe scheduler, forwarding table, channel membership,
//! duplicate suppression and the wire formats; time and packets in, actions
//! out. Filled by the relayd issue.
