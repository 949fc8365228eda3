//! RFC 8785, the JSON Canonicalization Scheme: object members sorted by the
//! UTF-16 code units of their names, no insignificant white space, numbers
//! formatted as ECMAScript's `Number.prototype.toString` does, strings with
//! the minimal escaping of `JSON.stringify`. The fingerprint of a value is the
//! lowercase hex SHA-256 of the UTF-8 bytes of its canonical text.
pub mod sql;

use serde_json::{Number, Value};
use sha2::{Digest, Sha256};
use std::fmt::Write;

#[derive(Debug, PartialEq, Eq)]
pub enum CanonError {
    /// A number whose magnitude is beyond an IEEE 754 double.
    NumberOutOfRange(String),
}

pub fn canonical_text(value: &Value) -> Result<String, CanonError> {
    let mut out = String::with_capacity(64);
    write_value(value, &mut out)?;
    Ok(out)
}

/// Parses JSON text (as `jsonb` prints it) and canonicalizes it.
pub fn canonical_from_json_text(text: &str) -> Result<String, CanonError> {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => canonical_text(&v),
        // jsonb text is valid JSON, so the one parse failure left is a
        // number too large for a double.
        Err(e) => Err(CanonError::NumberOutOfRange(e.to_string())),
    }
}

pub fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn write_value(value: &Value, out: &mut String) -> Result<(), CanonError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(n, out)?,
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push('{');
            for (i, (name, item)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(name, out);
                out.push(':');
                write_value(item, out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn write_number(n: &Number, out: &mut String) -> Result<(), CanonError> {
    // Integers too are formatted as the double they round to, as ECMAScript
    // does: 2^53 + 1 prints as 9007199254740992.
    let f = if let Some(i) = n.as_i64() {
        i as f64
    } else if let Some(u) = n.as_u64() {
        u as f64
    } else {
        n.as_f64().unwrap_or(f64::INFINITY)
    };
    if !f.is_finite() {
        return Err(CanonError::NumberOutOfRange(n.to_string()));
    }
    out.push_str(&es_number(f));
    Ok(())
}

/// ECMAScript's Number::toString(x) for a finite double (ECMA-262, 7.1.12.1).
pub fn es_number(f: f64) -> String {
    if f == 0.0 {
        return "0".to_string(); // also -0
    }
    let sign = if f < 0.0 { "-" } else { "" };
    // The spec asks for the fewest digits that round-trip and, of those, the
    // ones closest to the exact value, the even one on a tie. `{:e}` finds
    // how few digits suffice; formatting again with exactly that many picks
    // the closest, rounding half to even (1424953923781206.25 prints as
    // ...206.2, where the shortest mode alone gives ...206.3).
    let shortest = format!("{:e}", f.abs());
    let k = shortest
        .split_once('e')
        .expect("LowerExp has an exponent")
        .0
        .replace('.', "")
        .len();
    let sci = format!("{:.*e}", k - 1, f.abs());
    let (mantissa, exp) = sci
        .split_once('e')
        .expect("LowerExp always has an exponent");
    let exp: i32 = exp.parse().expect("LowerExp exponent is an integer");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let digits = match digits.trim_end_matches('0') {
        "" => "0".to_string(),
        d => d.to_string(),
    };
    let k = digits.len() as i32;
    let n = exp + 1;
    let body = if k <= n && n <= 21 {
        format!("{digits}{}", "0".repeat((n - k) as usize))
    } else if 0 < n && n <= 21 {
        format!("{}.{}", &digits[..n as usize], &digits[n as usize..])
    } else if -6 < n && n <= 0 {
        format!("0.{}{digits}", "0".repeat((-n) as usize))
    } else {
        let e = n - 1;
        let e_sign = if e >= 0 { '+' } else { '-' };
        let m = if k == 1 {
            digits
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        format!("{m}e{e_sign}{}", e.abs())
    };
    format!("{sign}{body}")
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{0c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod unit {
    use super::*;

    fn canon(text: &str) -> String {
        canonical_from_json_text(text).unwrap()
    }

    /// The number table of RFC 8785, Appendix B (IEEE 754 bit patterns).
    #[test]
    fn rfc8785_appendix_b_numbers() {
        let cases: &[(u64, &str)] = &[
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for (bits, want) in cases {
            assert_eq!(es_number(f64::from_bits(*bits)), *want, "bits {bits:#018x}");
        }
    }

    /// RFC 8785, section 3.2.2 and 3.2.3: the sorting and the whole example.
    #[test]
    fn rfc8785_examples() {
        let sorting = r#"{"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh", "1": "One", "\ud83d\ude00": "Emoji: Grinning Face", "\u0080": "Control", "\u00f6": "Latin Small Letter O With Diaeresis"}"#;
        assert_eq!(
            canon(sorting),
            "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",\"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\"\u{20ac}\":\"Euro Sign\",\"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}"
        );
        let example = r#"{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001], "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/", "literals": [null, true, false]}"#;
        assert_eq!(
            canon(example),
            "{\"literals\":[null,true,false],\"numbers\":[333333333.3333333,1e+30,4.5,0.002,1e-27],\"string\":\"\u{20ac}$\\u000f\\nA'B\\\"\\\\\\\\\\\"/\"}"
        );
    }

    #[test]
    fn fingerprint_is_sha256_of_canonical_text() {
        // sha256("{}") and sha256("[]") as published by any SHA-256 tool.
        assert_eq!(
            hex(&sha256(&canon("{ }"))),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(
            hex(&sha256(&canon("[ ]"))),
            "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945"
        );
        assert_eq!(canon(r#"{"b":1,"a":2}"#), canon(r#"{"a":2, "b":1.0}"#));
    }

    #[test]
    fn out_of_range_numbers_are_refused() {
        let big = format!("[1{}]", "0".repeat(400));
        assert!(matches!(
            canonical_from_json_text(&big),
            Err(CanonError::NumberOutOfRange(_))
        ));
    }
}
