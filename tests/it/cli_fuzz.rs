//! Bad input through the binary, as a user types it: every rejected value exits 2 with exactly one
//! stderr line naming the flag or config key as the user wrote it. A bounded proptest run over
//! flags x bad values, then the parsers of files a user brings (config.json, CNN files,
//! coefficient tables), including the values that used to wrap silently.

use proptest::prelude::*;
use std::path::Path;
use std::process::Command;

use crate::common::vramcal as run;

/// Exit 2, one line on stderr, and that line names `field`.
fn assert_one_line(args: &[&str], field: &str) {
    let (code, _, err) = run(args);
    assert_eq!(code, 2, "{args:?}: exit {code}, stderr {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    assert!(
        err.contains(field),
        "{args:?}: '{}' does not name {field}",
        err.trim_end()
    );
}

/// Values no numeric flag accepts.
const NOT_NUMBERS: [&str; 9] = [
    "-1",
    "abc",
    "",
    "1e999",
    "18446744073709551616",
    "99999999999999999999999",
    " ",
    "½",
    "0x10",
];

/// (flag, values that flag rejects beyond NOT_NUMBERS)
fn bad_values() -> Vec<(&'static str, Vec<&'static str>)> {
    let huge = "18446744073709551615";
    vec![
        ("batch", vec!["0", huge, "16777217"]),
        ("seq", vec!["0", huge]),
        ("image", vec!["0", huge, "65537"]),
        ("zero", vec!["4", huge]),
        ("gpus", vec!["0", huge]),
        ("workers", vec!["0", "1025"]),
        ("keep-checkpoints", vec!["100001", huge]),
        ("gpu-mem", vec!["0", "-80GB", "80XB", "1e30", "GB"]),
        ("sample-bytes", vec!["0", "-5", "2TiB"]),
        ("dataset", vec!["-1TB", "1e40"]),
        ("cache-fraction", vec!["-0.5", "101", "NaN", "inf"]),
    ]
}

fn case() -> impl Strategy<Value = (&'static str, String)> {
    prop::sample::select(bad_values()).prop_flat_map(|(flag, own)| {
        let mut all: Vec<String> = own.into_iter().map(String::from).collect();
        all.extend(NOT_NUMBERS.iter().map(|s| s.to_string()));
        // cache-fraction parses floats; "1e999" is inf there and "-1" negative, both rejected
        prop::sample::select(all).prop_map(move |v| (flag, v))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn bad_flag_values_exit_2_in_one_line((flag, value) in case()) {
        let flag_arg = format!("--{flag}");
        let mut args = vec!["estimate", "--model", "gpt2"];
        if flag == "zero" {
            args.extend(["--gpus", "8"]);
        }
        args.extend([flag_arg.as_str(), value.as_str()]);
        assert_one_line(&args, flag);
    }
}

#[test]
fn explicit_transformer_flags_are_named_as_typed() {
    let base = [
        "estimate", "--layers", "2", "--hidden", "64", "--heads", "4",
    ];
    let cases: [(&[&str], &str); 5] = [
        (&["--kv-heads", "3"], "kv-heads"),
        (
            &["--max-positions", "18446744073709551615"],
            "max-positions",
        ),
        (&["--ffn", "18446744073709551615"], "ffn"),
        (&["--vocab", "0"], "vocab"),
        (&["--classes", "0", "--arch", "encoder"], "classes"),
    ];
    for (extra, field) in cases {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        assert_one_line(&args, field);
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

/// Config values that used to wrap (a bert with 2^64-1 positions counted fewer parameters than
/// bert-base) are refused, naming the key as config.json spells it.
#[test]
fn config_json_values_are_range_checked_under_their_own_keys() {
    let dir = tempfile::tempdir().unwrap();
    let huge = "18446744073709551615";
    let bert = |k: &str, v: &str| {
        format!(
            r#"{{"model_type":"bert","hidden_size":768,"num_hidden_layers":12,"num_attention_heads":12,
            "intermediate_size":3072,"vocab_size":30522,"max_position_embeddings":512,"type_vocab_size":2,"{k}":{v}}}"#
        )
    };
    let gpt2 = |k: &str, v: &str| {
        format!(
            r#"{{"model_type":"gpt2","n_embd":768,"n_layer":12,"n_head":12,"vocab_size":50257,"n_positions":1024,"{k}":{v}}}"#
        )
    };
    let cases = [
        (
            bert("max_position_embeddings", huge),
            "max_position_embeddings",
        ),
        (bert("type_vocab_size", huge), "type_vocab_size"),
        (bert("hidden_size", huge), "hidden_size"),
        (bert("num_attention_heads", "7"), "num_attention_heads"),
        (bert("num_hidden_layers", "0"), "num_hidden_layers"),
        (bert("vocab_size", "-3"), "vocab_size"),
        (gpt2("n_positions", huge), "n_positions"),
        (gpt2("n_embd", huge), "n_embd"),
        (gpt2("n_inner", huge), "n_inner"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = write(dir.path(), &format!("c{i}.json"), text);
        assert_one_line(
            &["estimate", "--hf-config", &path],
            &format!("config.json {key}"),
        );
    }
}

#[test]
fn cnn_file_fields_are_range_checked() {
    let dir = tempfile::tempdir().unwrap();
    let huge = "18446744073709551615";
    let net = |layer: &str| {
        format!(
            r#"{{"name":"n","in_channels":3,"classes":10,"layers":[
            {{"type":"conv","k_h":3,"k_w":3,"c_in":3,"c_out":8,"padding":1}},
            {layer},
            {{"type":"flatten"}},{{"type":"linear","d_in":8,"d_out":10}}]}}"#
        )
    };
    let cases = [
        (
            net(r#"{"type":"adaptivepool","kind":"avg","out":0}"#),
            "adaptivepool.out",
        ),
        (
            net(&format!(
                r#"{{"type":"adaptivepool","kind":"avg","out":{huge}}}"#
            )),
            "adaptivepool.out",
        ),
        (
            net(r#"{"type":"pool","kind":"max","k":2,"stride":2,"padding":5}"#),
            "pool.padding",
        ),
        (
            net(&format!(
                r#"{{"type":"conv","k_h":1,"k_w":1,"c_in":8,"c_out":8,"padding":{huge}}}"#
            )),
            "conv.padding",
        ),
        (
            net(&format!(
                r#"{{"type":"conv","k_h":1,"k_w":1,"c_in":8,"c_out":{huge}}}"#
            )),
            "conv.c_out",
        ),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        let path = write(dir.path(), &format!("n{i}.json"), text);
        assert_one_line(&["estimate", "--cnn-file", &path], field);
    }
    // linear d_out past the range, at the end of a valid network
    let text = format!(
        r#"{{"name":"n","in_channels":3,"classes":10,"layers":[{{"type":"adaptivepool","kind":"avg","out":1}},
        {{"type":"flatten"}},{{"type":"linear","d_in":3,"d_out":{huge}}}]}}"#
    );
    let path = write(dir.path(), "d_out.json", &text);
    assert_one_line(&["estimate", "--cnn-file", &path], "linear.d_out");
}

/// A coefficient table is trusted by every plan made with it, so corrupt values are refused
/// where the table enters, naming the key: a negative fixed time (step of -99.98 s), an
/// absurd activation coefficient (wrapped total that "fits"), negative overheads, unknown keys.
#[test]
fn coefficient_tables_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let lit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration/literature.json"),
    )
    .unwrap();
    let mutate = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&lit).unwrap();
        f(&mut v);
        serde_json::to_string(&v).unwrap()
    };
    let set = |section: &'static str, key: &'static str, value: f64| {
        mutate(&move |v| v["modes"][0][section][key]["value"] = serde_json::json!(value))
    };
    let cases = [
        (set("time", "t0_s", -100.0), "time.t0_s"),
        (set("activation", "c_att", 1e300), "activation.c_att"),
        (set("overhead", "frag", -0.5), "overhead.frag"),
        (set("overhead", "const_bytes", -1.0), "overhead.const_bytes"),
        (set("activation", "half_copy", -1.0), "activation.half_copy"),
        (set("time", "mfu", 2.0), "time.mfu"),
        (
            set("time", "recompute_factor", 0.5),
            "time.recompute_factor",
        ),
        (
            mutate(&|v| {
                v["modes"][0]["activation"]["c_typo"] =
                    serde_json::json!({"value": 1.0, "source": "x"})
            }),
            "c_typo",
        ),
        (
            mutate(&|v| {
                let first = v["modes"][0].clone();
                v["modes"].as_array_mut().unwrap().push(first);
            }),
            "appears twice",
        ),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        let path = write(dir.path(), &format!("t{i}.json"), text);
        assert_one_line(&["estimate", "--model", "gpt2", "--coeffs", &path], field);
    }
}

/// `vramcal ... | head -c 0`: a closed stdout ends the process quietly, never with a panic.
#[test]
fn closed_stdout_is_not_a_panic() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_vramcal"))
        .args(["estimate", "--model", "llama2-7b", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before anything is written
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(out.status.code(), Some(101), "{err}");
}

/// Arguments clap itself rejects (unknown flags, missing values) are one line too, and the
/// byte-size flags of every subcommand take a leading '-' as a value to reject by name.
#[test]
fn clap_errors_and_other_subcommands_are_one_line() {
    let cases: [(&[&str], &str); 5] = [
        (&["estimate", "--modle", "gpt2"], "--modle"),
        (&["estimate", "--model"], "--model"),
        (
            &[
                "sweep",
                "--grid",
                "g.toml",
                "--out",
                "o.csv",
                "--max-mem",
                "-5",
            ],
            "max-mem",
        ),
        (
            &["calibrate", "--device", "cpu", "--max-mem", "-1GB"],
            "max-mem",
        ),
        (
            &["measure", "--model", "tiny-gpt", "--batch", "-3"],
            "batch",
        ),
    ];
    for (args, field) in cases {
        assert_one_line(args, field);
    }
}
