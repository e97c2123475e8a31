//! Helpers for black-box tests of the real binaries (`tests/tests/*.rs`).
