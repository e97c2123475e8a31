//! The relay daemon. Filled by the relayd issue.
fn main() {}
