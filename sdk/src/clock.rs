//! UTC timestamps as trackers and evaluation harnesses write them, from the system clock
//! (in a WebAssembly plugin, the clock stands still at the epoch unless `allow_clock` grants
//! the real one).

/// A moment, in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct UtcTime {
    /// Seconds since 1970-01-01T00:00:00Z.
    pub unix_seconds: i64,
    /// Microseconds within the second.
    pub micros: u32,
}

impl UtcTime {
    /// Now.
    pub fn now() -> Self {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            unix_seconds: since.as_secs() as i64,
            micros: since.subsec_micros(),
        }
    }

    /// Year, month, day, hour, minute, second.
    pub fn parts(&self) -> (i64, u32, u32, u32, u32, u32) {
        let days = self.unix_seconds.div_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let rest = self.unix_seconds.rem_euclid(86_400) as u32;
        (year, month, day, rest / 3600, rest % 3600 / 60, rest % 60)
    }

    /// `2026-11-22T21:31:28.374403Z`.
    pub fn iso8601(&self) -> String {
        let (y, mo, d, h, mi, s) = self.parts();
        format!(
            "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:06}Z",
            self.micros
        )
    }

    /// `20261122_213128`, as directory names use it.
    pub fn compact(&self) -> String {
        let (y, mo, d, h, mi, s) = self.parts();
        format!("{y:04}{mo:02}{d:02}_{h:02}{mi:02}{s:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        let t = UtcTime {
            unix_seconds: 0,
            micros: 0,
        };
        assert_eq!(t.iso8601(), "1970-01-01T00:00:00.000000Z");
        let t = UtcTime {
            unix_seconds: 1_795_383_088,
            micros: 374_403,
        };
        assert_eq!(t.iso8601(), "2026-11-22T21:31:28.374403Z");
        assert_eq!(t.compact(), "20261122_213128");
        let leap = UtcTime {
            unix_seconds: 951_782_400,
            micros: 0,
        };
        assert_eq!(leap.iso8601(), "2000-02-29T00:00:00.000000Z");
    }
}
