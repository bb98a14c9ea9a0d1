//! Times and ages on the command line: RFC 3339 timestamps in UTC (`2026-05-01T12:00:00Z`),
//! dates (`2026-05-01`) and ages (`90s`, `30m`, `12h`, `7d`), without a date library.

use std::time::Duration;

use effects_core::store::Millis;

const MS_PER_DAY: i64 = 86_400_000;

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `2026-05-01T12:00:00Z`: a store time in UTC, to the second.
pub(crate) fn format(at: Millis) -> String {
    let days = at.div_euclid(MS_PER_DAY);
    let in_day = at.rem_euclid(MS_PER_DAY) / 1000;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60
    )
}

/// An age as people say it: `45s`, `12m`, `3h`, `2d`.
pub(crate) fn format_age(ms: Millis) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Parses an age: a number and a unit, `s`, `m`, `h` or `d` (`90s`, `30m`, `12h`, `7d`).
pub(crate) fn parse_age(text: &str) -> Result<Duration, String> {
    let bad =
        || format!("`{text}` is not an age: a whole number and a unit, s, m, h or d (`30m`, `7d`)");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

fn number(text: &str, what: &str) -> Result<i64, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{text}` is not a {what}"));
    }
    text.parse()
        .map_err(|_| format!("`{text}` is not a {what}"))
}

/// Parses a point in time: an age ago (`30m`, `7d`), a date (`2026-05-01`, midnight UTC) or an
/// RFC 3339 time in UTC (`2026-05-01T12:00:00Z`, seconds and a fraction optional).
pub(crate) fn parse_since(text: &str, now: Millis) -> Result<Millis, String> {
    if let Ok(age) = parse_age(text) {
        let ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        return Ok(now.saturating_sub(ms));
    }
    let hint = || {
        format!(
            "`{text}` is neither an age (`30m`, `7d`) nor a UTC time (`2026-05-01` or \
             `2026-05-01T12:00:00Z`)"
        )
    };
    let (date, time) = match text.split_once('T') {
        Some((date, time)) => (date, Some(time)),
        None => (text, None),
    };
    let mut parts = date.split('-');
    let (Some(y), Some(m), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(hint());
    };
    let (y, m, d) = (
        number(y, "year").map_err(|_| hint())?,
        number(m, "month").map_err(|_| hint())?,
        number(d, "day").map_err(|_| hint())?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(hint());
    }
    let mut ms = days_from_civil(y, m, d).saturating_mul(MS_PER_DAY);
    if let Some(time) = time {
        let time = time
            .strip_suffix('Z')
            .or_else(|| time.strip_suffix('z'))
            .ok_or_else(|| format!("{}: give the time in UTC, ending in `Z`", hint()))?;
        let (clock, fraction) = match time.split_once('.') {
            Some((clock, fraction)) => (clock, Some(fraction)),
            None => (time, None),
        };
        let mut fields = clock.split(':');
        let hour = number(fields.next().unwrap_or_default(), "hour").map_err(|_| hint())?;
        let minute = number(fields.next().unwrap_or_default(), "minute").map_err(|_| hint())?;
        let second = match fields.next() {
            Some(s) => number(s, "second").map_err(|_| hint())?,
            None => 0,
        };
        if fields.next().is_some() || hour > 23 || minute > 59 || second > 60 {
            return Err(hint());
        }
        ms += ((hour * 60 + minute) * 60 + second) * 1000;
        if let Some(fraction) = fraction {
            let digits: String = fraction.chars().take(3).collect();
            let scale = 10_i64.pow(3 - u32::try_from(digits.len()).unwrap_or(3));
            ms += number(&digits, "fraction").map_err(|_| hint())? * scale;
        }
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        for at in [
            0,
            1_000,
            951_782_400_000,
            1_777_636_800_000,
            4_102_444_799_000,
        ] {
            assert_eq!(parse_since(&format(at), 0), Ok(at), "{}", format(at));
        }
        assert_eq!(format(0), "1970-01-01T00:00:00Z");
        assert_eq!(format(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(parse_since("2000-02-29", 0), Ok(951_782_400_000));
        assert_eq!(
            parse_since("1970-01-01T00:00:01.5Z", 0),
            Ok(1_500),
            "a fraction of a second"
        );
    }

    #[test]
    fn ages() {
        assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_age("7").is_err());
        assert!(parse_age("d").is_err());
        assert!(parse_age("7w").is_err());
        assert_eq!(parse_since("30m", 3_600_000), Ok(1_800_000));
        assert_eq!(format_age(59_999), "59s");
        assert_eq!(format_age(3_600_000), "1h");
    }

    #[test]
    fn bad_times_say_what_is_expected() {
        for bad in [
            "yesterday",
            "2026-13-01",
            "2026-05-01T12:00:00+02:00",
            "2026-05-01T25:00Z",
        ] {
            let err = parse_since(bad, 0).unwrap_err();
            assert!(err.contains("UTC"), "{bad}: {err}");
        }
    }
}
