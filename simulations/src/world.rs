//! Worlds: relay sites and the base link metrics between them.
//!
//! Three sources, in order of preference:
//! - the RIPE Atlas country-to-country RTTs in
//!   `../shared/data/country_rtt_stat.csv.gz`, with relay sites taken from
//!   the WonderNetwork server list in the same folder (or the built-in
//!   country table);
//! - any latency matrix in the CSV form `src,dst,rtt_ms[,jitter_ms,loss]`;
//! - a small built-in world (the country table below, great-circle fiber
//!   delay times a per-pair inflation factor), used when the data folder is
//!   missing so that everything runs on any machine.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use topology::{Graph, Metrics, RelayId};

use crate::geo::Site;

/// Errors while loading a world.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A CSV row or header is malformed.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        message: String,
    },
    /// A site has no known coordinates.
    #[error(
        "unknown site {0:?}: not a country code of the built-in table and not in the --sites file"
    )]
    UnknownSite(String),
    /// Fewer than two sites remain.
    #[error("the world has fewer than two sites with links")]
    TooSmall,
}

/// A country of the built-in table: ISO code, name as in the WonderNetwork
/// list, a major hub city and its coordinates.
#[derive(Debug, Clone, Copy)]
pub struct Country {
    /// ISO 3166 alpha-2 code.
    pub code: &'static str,
    /// English name, as the WonderNetwork list spells it.
    pub name: &'static str,
    /// The city a relay would sit in.
    pub city: &'static str,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
}

macro_rules! countries {
    ($($code:literal, $name:literal, $city:literal, $lat:literal, $lon:literal;)*) => {
        /// Countries with a hub city each: the built-in world and the
        /// default relay set of the country RTT world.
        pub const COUNTRIES: &[Country] = &[$(Country { code: $code, name: $name, city: $city, lat: $lat, lon: $lon }),*];
    };
}

countries! {
    "ID", "Indonesia", "Jakarta", -6.2088, 106.8456;
    "MY", "Malaysia", "Kuala Lumpur", 3.1390, 101.6869;
    "PH", "Philippines", "Manila", 14.5995, 120.9842;
    "SG", "Singapore", "Singapore", 1.3521, 103.8198;
    "TH", "Thailand", "Bangkok", 13.7563, 100.5018;
    "VN", "Vietnam", "Ho Chi Minh City", 10.8231, 106.6297;
    "HK", "Hong Kong", "Hong Kong", 22.3193, 114.1694;
    "CN", "China", "Shanghai", 31.2304, 121.4737;
    "TW", "Taiwan", "Taipei", 25.0330, 121.5654;
    "JP", "Japan", "Tokyo", 35.6762, 139.6503;
    "KR", "South Korea", "Seoul", 37.5665, 126.9780;
    "IN", "India", "Mumbai", 19.0760, 72.8777;
    "PK", "Pakistan", "Karachi", 24.8607, 67.0011;
    "BD", "Bangladesh", "Dhaka", 23.8103, 90.4125;
    "LK", "Sri Lanka", "Colombo", 6.9271, 79.8612;
    "AE", "United Arab Emirates", "Dubai", 25.2048, 55.2708;
    "SA", "Saudi Arabia", "Riyadh", 24.7136, 46.6753;
    "QA", "Qatar", "Doha", 25.2854, 51.5310;
    "IL", "Israel", "Tel Aviv", 32.0853, 34.7818;
    "TR", "Turkey", "Istanbul", 41.0082, 28.9784;
    "EG", "Egypt", "Cairo", 30.0444, 31.2357;
    "ZA", "South Africa", "Johannesburg", -26.2041, 28.0473;
    "NG", "Nigeria", "Lagos", 6.5244, 3.3792;
    "KE", "Kenya", "Nairobi", -1.2921, 36.8219;
    "GB", "United Kingdom", "London", 51.5074, -0.1278;
    "DE", "Germany", "Frankfurt", 50.1109, 8.6821;
    "FR", "France", "Paris", 48.8566, 2.3522;
    "NL", "Netherlands", "Amsterdam", 52.3676, 4.9041;
    "ES", "Spain", "Madrid", 40.4168, -3.7038;
    "IT", "Italy", "Milan", 45.4642, 9.1900;
    "PT", "Portugal", "Lisbon", 38.7223, -9.1393;
    "PL", "Poland", "Warsaw", 52.2297, 21.0122;
    "SE", "Sweden", "Stockholm", 59.3293, 18.0686;
    "RO", "Romania", "Bucharest", 44.4268, 26.1025;
    "GR", "Greece", "Athens", 37.9838, 23.7275;
    "UA", "Ukraine", "Kyiv", 50.4501, 30.5234;
    "RU", "Russia", "Moscow", 55.7558, 37.6173;
    "KZ", "Kazakhstan", "Almaty", 43.2220, 76.8512;
    "US", "United States", "Dallas", 32.7767, -96.7970;
    "CA", "Canada", "Toronto", 43.6532, -79.3832;
    "MX", "Mexico", "Mexico City", 19.4326, -99.1332;
    "BR", "Brazil", "Sao Paulo", -23.5505, -46.6333;
    "AR", "Argentina", "Buenos Aires", -34.6037, -58.3816;
    "CL", "Chile", "Santiago", -33.4489, -70.6693;
    "CO", "Colombia", "Bogota", 4.7110, -74.0721;
    "PE", "Peru", "Lima", -12.0464, -77.0428;
    "AU", "Australia", "Sydney", -33.8688, 151.2093;
    "NZ", "New Zealand", "Auckland", -36.8485, 174.7633;
}

/// Looks up a country of the built-in table.
pub fn country(code: &str) -> Option<&'static Country> {
    COUNTRIES.iter().find(|c| c.code.eq_ignore_ascii_case(code))
}

/// Built-in world: RTT = great-circle fiber RTT x inflation + 2 ms.
///
/// The inflation of a pair is fixed (not random between runs) and lies in
/// [1.5, 3.0]: "Internet RTTs are typically 2x or more above the
/// great-circle fiber bound" (shared/data/README.md). It varies per pair so
/// that, as on the real Internet, some detours beat some direct paths.
pub const BUILTIN_INFLATION: (f64, f64) = (1.5, 3.0);
/// Access and processing delay added to every built-in link, ms.
pub const BUILTIN_ACCESS_MS: f64 = 2.0;

/// Relay sites and directed base metrics between them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct World {
    /// Where the numbers come from, for reports.
    pub source: String,
    /// Relay sites; relay `i` of the graph is `RelayId(i)`.
    pub sites: Vec<Site>,
    /// Directed base metrics `(from, to) -> metrics` by site index.
    pub links: BTreeMap<(usize, usize), Metrics>,
}

/// How to read the RIPE Atlas country RTT table.
#[derive(Debug, Clone, Copy)]
pub struct CountryRttOptions {
    /// Pairs measured with fewer pings are dropped as noise.
    pub min_pings: u64,
    /// Jitter of a link as this factor times the pair's RTT standard
    /// deviation (0 leaves jitter out: `rtt_std` over days of pings mostly
    /// measures route changes and congestion, not packet-to-packet jitter).
    pub jitter_from_std: f64,
}

impl Default for CountryRttOptions {
    fn default() -> Self {
        Self {
            min_pings: 10,
            jitter_from_std: 0.0,
        }
    }
}

impl World {
    /// The index of a site by code.
    pub fn site_index(&self, code: &str) -> Option<usize> {
        self.sites
            .iter()
            .position(|s| s.code.eq_ignore_ascii_case(code))
    }

    /// The overlay graph: relay `i` is `RelayId(i)`, one link per base link.
    pub fn graph(&self) -> Graph {
        let mut g = Graph::new();
        for i in 0..self.sites.len() {
            g.add_relay(RelayId(i as u32));
        }
        for (&(a, b), m) in &self.links {
            g.set_link(RelayId(a as u32), RelayId(b as u32), *m)
                .expect("world links join known sites with valid metrics");
        }
        g
    }

    /// The built-in world over `codes` (or the whole table when empty).
    pub fn builtin(codes: &[&str]) -> Result<World, WorldError> {
        let sites = builtin_sites(codes)?;
        let mut links = BTreeMap::new();
        for a in 0..sites.len() {
            for b in 0..sites.len() {
                if a == b {
                    continue;
                }
                let (lo, hi) = BUILTIN_INFLATION;
                let inflation = lo + (hi - lo) * pair_unit(&sites[a].code, &sites[b].code);
                let rtt = sites[a].fiber_rtt_ms(&sites[b]) * inflation + BUILTIN_ACCESS_MS;
                links.insert((a, b), Metrics::rtt(rtt));
            }
        }
        Ok(World {
            source: format!(
                "built-in world: {} sites, great-circle fiber RTT x {}-{} + {} ms",
                sites.len(),
                BUILTIN_INFLATION.0,
                BUILTIN_INFLATION.1,
                BUILTIN_ACCESS_MS
            ),
            sites,
            links,
        })
    }

    /// The RIPE Atlas country RTT table (`country_rtt_stat.csv.gz`) over the
    /// given sites.
    ///
    /// Base RTT of a pair: the midpoint of the floor and the mean, where the
    /// floor is the measured minimum raised to the great-circle fiber RTT
    /// between the two sites (minima near 0 ms come from anycast
    /// destinations). The mean includes congestion tails; the minimum is
    /// the best case; the midpoint is a typical uncongested RTT. The table
    /// is symmetric (upper triangle), so both directions get the same value.
    /// Pairs whose mean is below the fiber bound are physically impossible
    /// (pings answered by anycast replicas outside the country) and dropped.
    pub fn from_country_rtt(
        path: &Path,
        sites: Vec<Site>,
        options: &CountryRttOptions,
    ) -> Result<World, WorldError> {
        let text = read_maybe_gz(path)?;
        let index: HashMap<String, usize> = sites
            .iter()
            .enumerate()
            .map(|(i, s)| (s.code.to_uppercase(), i))
            .collect();
        let mut rdr = csv::Reader::from_reader(text.as_bytes());
        let headers = rdr.headers().map_err(|e| format_err(path, e))?.clone();
        let col = |name: &str| {
            headers
                .iter()
                .position(|h| h == name)
                .ok_or_else(|| WorldError::Format {
                    path: path.to_owned(),
                    message: format!("missing column {name}"),
                })
        };
        let (c1, c2, cnt, avg, std, min) = (
            col("cty1")?,
            col("cty2")?,
            col("rtt_cnt")?,
            col("rtt_avg")?,
            col("rtt_std")?,
            col("rtt_min")?,
        );
        let mut links = BTreeMap::new();
        let (mut dropped, mut impossible) = (0usize, 0usize);
        for (line, rec) in rdr.records().enumerate() {
            let rec = rec.map_err(|e| format_err(path, e))?;
            let (Some(&a), Some(&b)) = (
                index.get(&rec[c1].to_uppercase()),
                index.get(&rec[c2].to_uppercase()),
            ) else {
                continue;
            };
            if a == b {
                continue;
            }
            let num = |c: usize| -> Result<f64, WorldError> {
                rec[c].parse::<f64>().map_err(|e| WorldError::Format {
                    path: path.to_owned(),
                    message: format!("line {}: column {}: {e}", line + 2, &headers[c]),
                })
            };
            if (num(cnt)? as u64) < options.min_pings {
                dropped += 1;
                continue;
            }
            let bound = sites[a].fiber_rtt_ms(&sites[b]);
            if num(avg)? < bound {
                // A mean below the speed of light between the sites: most
                // pings reached anycast replicas elsewhere, not the country.
                impossible += 1;
                continue;
            }
            let floor = num(min)?.max(bound);
            let mean = num(avg)?;
            let m = Metrics {
                rtt_ms: (floor + mean) / 2.0,
                jitter_ms: options.jitter_from_std * num(std)?,
                loss: 0.0,
            };
            links.insert((a, b), m);
            links.insert((b, a), m);
        }
        let world = World {
            source: format!(
                "RIPE Atlas country RTTs ({}): base RTT = midpoint of max(min, fiber bound) and mean; \
                 dropped: {dropped} pairs with < {} pings, {impossible} with a mean below the fiber bound \
                 (anycast){}",
                path.display(),
                options.min_pings,
                if options.jitter_from_std > 0.0 {
                    format!(", jitter = {} x rtt_std", options.jitter_from_std)
                } else {
                    ", jitter and loss not in the data".to_string()
                }
            ),
            sites,
            links,
        };
        world.check()
    }

    /// A latency matrix in the documented CSV form: a header naming at least
    /// `src,dst,rtt_ms`, optionally `jitter_ms` and `loss` (fraction); one
    /// row per directed pair. A pair given in one direction only is used for
    /// both. Sites are country codes of the built-in table or appear in
    /// `sites` (`code,city,lat,lon`).
    pub fn from_matrix_csv(path: &Path, sites_file: Option<&Path>) -> Result<World, WorldError> {
        let extra = match sites_file {
            Some(p) => read_sites(p)?,
            None => Vec::new(),
        };
        let text = read_maybe_gz(path)?;
        let mut rdr = csv::Reader::from_reader(text.as_bytes());
        let headers = rdr.headers().map_err(|e| format_err(path, e))?.clone();
        let col = |name: &str| headers.iter().position(|h| h.trim() == name);
        let missing = |name: &str| WorldError::Format {
            path: path.to_owned(),
            message: format!("missing column {name} (expected src,dst,rtt_ms[,jitter_ms,loss])"),
        };
        let (src, dst, rtt) = (
            col("src").ok_or_else(|| missing("src"))?,
            col("dst").ok_or_else(|| missing("dst"))?,
            col("rtt_ms").ok_or_else(|| missing("rtt_ms"))?,
        );
        let (jitter, loss) = (col("jitter_ms"), col("loss"));
        let mut sites: Vec<Site> = Vec::new();
        let mut site_of = |code: &str| -> Result<usize, WorldError> {
            if let Some(i) = sites.iter().position(|s| s.code == code) {
                return Ok(i);
            }
            let site = extra
                .iter()
                .find(|s| s.code == code)
                .cloned()
                .or_else(|| country(code).map(country_site))
                .ok_or_else(|| WorldError::UnknownSite(code.to_owned()))?;
            sites.push(site);
            Ok(sites.len() - 1)
        };
        let mut given = BTreeMap::new();
        for (line, rec) in rdr.records().enumerate() {
            let rec = rec.map_err(|e| format_err(path, e))?;
            let bad = |what: &str| WorldError::Format {
                path: path.to_owned(),
                message: format!("line {}: {what}", line + 2),
            };
            let field = |c: Option<usize>| -> Result<f64, WorldError> {
                match c.and_then(|c| rec.get(c)).map(str::trim) {
                    None | Some("") => Ok(0.0),
                    Some(v) => v.parse().map_err(|_| bad(&format!("not a number: {v:?}"))),
                }
            };
            let (a, b) = (site_of(rec[src].trim())?, site_of(rec[dst].trim())?);
            if a == b {
                return Err(bad("a link from a site to itself"));
            }
            let m = Metrics {
                rtt_ms: field(Some(rtt))?,
                jitter_ms: field(jitter)?,
                loss: field(loss)?,
            };
            if !m.is_valid() {
                return Err(bad(&format!("invalid metrics {m:?}")));
            }
            given.insert((a, b), m);
        }
        let mut links = given.clone();
        for (&(a, b), m) in &given {
            links.entry((b, a)).or_insert(*m);
        }
        World {
            source: format!("latency matrix {}", path.display()),
            sites,
            links,
        }
        .check()
    }

    fn check(self) -> Result<World, WorldError> {
        if self.sites.len() < 2 || self.links.is_empty() {
            return Err(WorldError::TooSmall);
        }
        Ok(self)
    }
}

/// Sites for `codes` (the whole table when empty) from the built-in table.
pub fn builtin_sites(codes: &[&str]) -> Result<Vec<Site>, WorldError> {
    if codes.is_empty() {
        return Ok(COUNTRIES.iter().map(country_site).collect());
    }
    codes
        .iter()
        .map(|c| {
            country(c)
                .map(country_site)
                .ok_or_else(|| WorldError::UnknownSite((*c).to_owned()))
        })
        .collect()
}

/// Sites for `codes` placed at WonderNetwork server locations: the table's
/// hub city when the list has it, else the list's first server in that
/// country, else the built-in coordinates.
pub fn wondernetwork_sites(path: &Path, codes: &[&str]) -> Result<Vec<Site>, WorldError> {
    let text = read_maybe_gz(path)?;
    let mut rdr = csv::Reader::from_reader(text.as_bytes());
    let headers = rdr.headers().map_err(|e| format_err(path, e))?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| WorldError::Format {
                path: path.to_owned(),
                message: format!("missing column {name}"),
            })
    };
    let (title, country_col, lat, lon) = (
        col("title")?,
        col("country")?,
        col("latitude")?,
        col("longitude")?,
    );
    let mut servers: Vec<(String, String, f64, f64)> = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| format_err(path, e))?;
        let (Ok(la), Ok(lo)) = (rec[lat].parse::<f64>(), rec[lon].parse::<f64>()) else {
            continue;
        };
        servers.push((rec[country_col].to_owned(), rec[title].to_owned(), la, lo));
    }
    builtin_sites(codes)?
        .into_iter()
        .map(|site| {
            let c = country(&site.code).expect("built-in sites are table countries");
            let in_country = servers.iter().filter(|s| s.0 == c.name);
            let pick = in_country
                .clone()
                .find(|s| s.1 == c.city)
                .or_else(|| in_country.clone().next());
            Ok(match pick {
                Some((_, city, la, lo)) => Site {
                    code: site.code,
                    city: city.clone(),
                    lat: *la,
                    lon: *lo,
                },
                None => site,
            })
        })
        .collect()
}

fn country_site(c: &Country) -> Site {
    Site {
        code: c.code.to_owned(),
        city: c.city.to_owned(),
        lat: c.lat,
        lon: c.lon,
    }
}

fn read_sites(path: &Path) -> Result<Vec<Site>, WorldError> {
    let text = read_maybe_gz(path)?;
    let mut rdr = csv::Reader::from_reader(text.as_bytes());
    let mut out = Vec::new();
    for rec in rdr.deserialize::<Site>() {
        out.push(rec.map_err(|e| format_err(path, e))?);
    }
    Ok(out)
}

fn read_maybe_gz(path: &Path) -> Result<String, WorldError> {
    let io = |source| WorldError::Io {
        path: path.to_owned(),
        source,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    let mut text = String::new();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_string(&mut text)
            .map_err(io)?;
    } else {
        text = String::from_utf8(bytes)
            .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    }
    Ok(text)
}

fn format_err(path: &Path, e: csv::Error) -> WorldError {
    WorldError::Format {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// A number in [0, 1) fixed by an unordered pair of codes (FNV-1a, then a
/// SplitMix64 finaliser), so built-in worlds are the same on every run.
fn pair_unit(a: &str, b: &str) -> f64 {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in lo.bytes().chain([0u8]).chain(hi.bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Where the shared data folder is: `explicit` if given (it must exist),
/// else `../shared/data` from the current directory, else beside the
/// workspace this binary was built from. `None` when not found.
pub fn find_data_dir(explicit: Option<&Path>) -> Result<Option<PathBuf>, WorldError> {
    if let Some(p) = explicit {
        return if p.is_dir() {
            Ok(Some(p.to_owned()))
        } else {
            Err(WorldError::Io {
                path: p.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "data folder not found"),
            })
        };
    }
    let candidates = [
        PathBuf::from("../shared/data"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"),
    ];
    Ok(candidates
        .into_iter()
        .find(|p| p.join("country_rtt_stat.csv.gz").is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_world_is_deterministic_and_symmetric() {
        let w = World::builtin(&["SG", "ID", "US", "DE"]).unwrap();
        let w2 = World::builtin(&["SG", "ID", "US", "DE"]).unwrap();
        assert_eq!(w.links, w2.links);
        assert_eq!(w.links.len(), 12);
        let (sg, de) = (w.site_index("SG").unwrap(), w.site_index("DE").unwrap());
        assert_eq!(w.links[&(sg, de)], w.links[&(de, sg)]);
        let bound = w.sites[sg].fiber_rtt_ms(&w.sites[de]);
        let rtt = w.links[&(sg, de)].rtt_ms;
        assert!(
            rtt >= 1.5 * bound + 2.0 && rtt <= 3.0 * bound + 2.0,
            "{rtt} vs bound {bound}"
        );
        assert!(World::builtin(&["XX"]).is_err());
    }

    #[test]
    fn matrix_csv_with_optional_columns() {
        let dir = std::env::temp_dir().join(format!("world-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = dir.join("m.csv");
        std::fs::write(
            &m,
            "src,dst,rtt_ms,jitter_ms,loss\nSG,ID,20,1,0.001\nID,SG,22,,\nSG,FOO,50,2,0\n",
        )
        .unwrap();
        assert!(
            matches!(World::from_matrix_csv(&m, None), Err(WorldError::UnknownSite(s)) if s == "FOO")
        );
        let sites = dir.join("sites.csv");
        std::fs::write(&sites, "code,city,lat,lon\nFOO,Foo Town,10.0,100.0\n").unwrap();
        let w = World::from_matrix_csv(&m, Some(&sites)).unwrap();
        let (sg, id, foo) = (
            w.site_index("SG").unwrap(),
            w.site_index("ID").unwrap(),
            w.site_index("FOO").unwrap(),
        );
        assert_eq!(w.links[&(sg, id)].loss, 0.001);
        assert_eq!(w.links[&(id, sg)].rtt_ms, 22.0);
        assert_eq!(w.links[&(id, sg)].jitter_ms, 0.0);
        assert_eq!(
            w.links[&(foo, sg)].rtt_ms,
            50.0,
            "one direction given: used for both"
        );
        std::fs::write(&m, "src,dst,rtt_ms\nSG,ID,abc\n").unwrap();
        let err = World::from_matrix_csv(&m, None).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("abc"), "{err}");
        std::fs::write(&m, "from,to,rtt\nSG,ID,1\n").unwrap();
        assert!(
            World::from_matrix_csv(&m, None)
                .unwrap_err()
                .to_string()
                .contains("missing column src")
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn country_rtt_fixture() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/country_rtt_small.csv");
        let sites = builtin_sites(&["SG", "ID", "US"]).unwrap();
        let w = World::from_country_rtt(&fixture, sites, &CountryRttOptions::default()).unwrap();
        let (sg, id, us) = (
            w.site_index("SG").unwrap(),
            w.site_index("ID").unwrap(),
            w.site_index("US").unwrap(),
        );
        // min 0.1 (anycast) is raised to the fiber bound before averaging.
        let bound = w.sites[id].fiber_rtt_ms(&w.sites[us]);
        let expected = (bound + 183.0) / 2.0;
        assert!((w.links[&(id, us)].rtt_ms - expected).abs() < 1e-9);
        assert_eq!(w.links[&(us, id)], w.links[&(id, us)]);
        // The SG-US row has only 5 pings: dropped.
        assert!(!w.links.contains_key(&(sg, us)));
        assert!((w.links[&(sg, id)].rtt_ms - (12.0 + 20.0) / 2.0).abs() < 1e-9);
    }
}
