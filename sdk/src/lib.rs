//! Client SDK: discovers relays over DNS, ranks them by GeoIP and live
//! probes, connects over QUIC and fails over. Filled by the SDK issue.
