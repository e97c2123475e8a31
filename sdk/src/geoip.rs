//! Where a client is, from its public address and a MaxMind DB file
//! (GeoLite2-City/Country or the DB-IP Lite files, which share the layout).

use std::net::IpAddr;
use std::path::Path;

use maxminddb::{PathElement, Reader};

/// What a database says about an address.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Place {
    /// `(latitude, longitude)` in degrees (City databases).
    pub location: Option<(f64, f64)>,
    /// ISO 3166 country code (City and Country databases).
    pub country: Option<String>,
}

/// Why a database could not be used.
#[derive(Debug, thiserror::Error)]
#[error("GeoIP database {path}: {message}")]
pub struct GeoIpError {
    path: String,
    message: String,
}

/// An open GeoIP database.
pub struct GeoIp {
    reader: Reader<Vec<u8>>,
}

impl std::fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoIp")
            .field("database_type", &self.reader.metadata().database_type)
            .finish()
    }
}

impl GeoIp {
    /// Opens a `.mmdb` file.
    pub fn open(path: &Path) -> Result<GeoIp, GeoIpError> {
        let bytes = std::fs::read(path).map_err(|e| GeoIpError {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        GeoIp::from_bytes(bytes).map_err(|mut e| {
            e.path = path.display().to_string();
            e
        })
    }

    /// Reads a database from memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GeoIp, GeoIpError> {
        let reader = Reader::from_source(bytes).map_err(|e| GeoIpError {
            path: "(memory)".into(),
            message: e.to_string(),
        })?;
        Ok(GeoIp { reader })
    }

    /// The database's type, e.g. `GeoLite2-City`.
    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    /// Looks `ip` up; `None` when the database knows nothing about it.
    /// A record with broken fields counts as unknown rather than an error:
    /// ranking then falls back to probing alone.
    pub fn locate(&self, ip: IpAddr) -> Option<Place> {
        let found = self.reader.lookup(ip).ok()?;
        if !found.has_data() {
            return None;
        }
        let f64_at = |path: &[PathElement<'_>]| found.decode_path::<f64>(path).ok().flatten();
        let lat = f64_at(&[PathElement::Key("location"), PathElement::Key("latitude")]);
        let lon = f64_at(&[PathElement::Key("location"), PathElement::Key("longitude")]);
        let location = match (lat, lon) {
            (Some(lat), Some(lon))
                if (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) =>
            {
                Some((lat, lon))
            }
            _ => None,
        };
        let country = found
            .decode_path::<String>(&[PathElement::Key("country"), PathElement::Key("iso_code")])
            .ok()
            .flatten()
            .map(|c| c.to_ascii_uppercase());
        (location.is_some() || country.is_some()).then_some(Place { location, country })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;
    use mmdb_writer::Writer;
    use serde_json::json;

    fn db(kind: &str, entries: &[(&str, serde_json::Value)]) -> GeoIp {
        let mut w = Writer::new(kind);
        for (net, v) in entries {
            w.insert(net.parse::<IpNet>().unwrap(), v).unwrap();
        }
        GeoIp::from_bytes(w.to_bytes().unwrap()).unwrap()
    }

    #[test]
    fn city_and_country_layouts() {
        let city = db(
            "GeoLite2-City",
            &[
                (
                    "203.0.113.0/24",
                    json!({"country": {"iso_code": "PH"}, "location": {"latitude": 14.6, "longitude": 121.0}}),
                ),
                ("2001:db8::/32", json!({"country": {"iso_code": "de"}})),
            ],
        );
        assert_eq!(city.database_type(), "GeoLite2-City");
        assert_eq!(
            city.locate("203.0.113.9".parse().unwrap()),
            Some(Place {
                location: Some((14.6, 121.0)),
                country: Some("PH".into())
            })
        );
        assert_eq!(
            city.locate("2001:db8::1".parse().unwrap()),
            Some(Place {
                location: None,
                country: Some("DE".into())
            })
        );
        assert_eq!(city.locate("198.51.100.1".parse().unwrap()), None);
    }

    #[test]
    fn broken_records_and_files_are_unknown_or_clear_errors() {
        let weird = db(
            "GeoLite2-City",
            &[(
                "203.0.113.0/24",
                json!({"location": {"latitude": "north", "longitude": 500.0}}),
            )],
        );
        assert_eq!(weird.locate("203.0.113.9".parse().unwrap()), None);
        let e = GeoIp::from_bytes(b"not a database".to_vec()).unwrap_err();
        assert!(e.to_string().contains("(memory)"), "{e}");
        let e = GeoIp::open(Path::new("/nonexistent/GeoLite2-City.mmdb")).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/GeoLite2-City.mmdb"),
            "{e}"
        );
    }
}
