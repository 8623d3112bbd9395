//! Held-out scoring never scores a point its table was fitted on: the fit closure records the
//! exact points each fold was given, and every scored point must be absent from its fold's set,
//! along with every other row of the same configuration shape.

use crate::fit_common::synthetic_rows;
use std::collections::{HashMap, HashSet};
use vramcal::fit::split::{
    extrapolation_holdout, extrapolation_with, fold_of, kfold_with, Evaluation,
};
use vramcal::fit::{fit_table, prepare, Meta};

fn check_disjoint(eval: &Evaluation, given: &[HashSet<String>], points: &[vramcal::fit::Point]) {
    assert!(!eval.predictions.is_empty());
    for p in &eval.predictions {
        let fit_set = &given[p.fold];
        let shape = &points[p.point].shape;
        assert!(
            !fit_set.contains(shape),
            "point {} (shape {shape}) was scored in fold {} that was fitted on it",
            p.point,
            p.fold
        );
    }
}

#[test]
fn kfold_never_scores_a_fitted_configuration() {
    let (points, _) = prepare(&synthetic_rows(0.005, 3));
    let meta = Meta::from_points(&points);
    let mut given: Vec<HashSet<String>> = Vec::new();
    let eval = kfold_with(&points, 5, |train| {
        given.push(train.iter().map(|p| p.shape.clone()).collect());
        fit_table(train, &meta)
    })
    .unwrap();
    assert_eq!(given.len(), 5, "one fit per fold");
    check_disjoint(&eval, &given, &points);
    // every point is scored exactly once
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for p in &eval.predictions {
        *seen.entry(p.point).or_default() += 1;
    }
    assert_eq!(seen.len(), points.len());
    assert!(seen.values().all(|&n| n == 1));
    // rows sharing a shape (here: AdamW and SGD runs of one configuration) share a fold
    let mut fold_of_shape: HashMap<&str, usize> = HashMap::new();
    for p in &eval.predictions {
        let f = *fold_of_shape
            .entry(points[p.point].shape.as_str())
            .or_insert(p.fold);
        assert_eq!(f, p.fold);
        assert_eq!(f, fold_of(&points[p.point].shape, 5));
    }
    let shared = points.len() - fold_of_shape.len();
    assert!(
        shared > 0,
        "the grid should contain repeated shapes to exercise grouping"
    );
    // folds are reasonably balanced (hash assignment)
    let mut sizes = [0usize; 5];
    for p in &eval.predictions {
        sizes[p.fold] += 1;
    }
    assert!(
        sizes.iter().all(|&s| s * 10 > points.len()),
        "fold sizes {sizes:?}"
    );
}

#[test]
fn extrapolation_holds_out_each_models_largest_configuration() {
    let (points, _) = prepare(&synthetic_rows(0.005, 4));
    let meta = Meta::from_points(&points);
    let mut given: Vec<HashSet<String>> = Vec::new();
    let eval = extrapolation_with(&points, |train| {
        given.push(train.iter().map(|p| p.shape.clone()).collect());
        fit_table(train, &meta)
    })
    .unwrap();
    check_disjoint(&eval, &given, &points);
    let held = extrapolation_holdout(&points);
    for (i, p) in points.iter().enumerate() {
        let size = p.train.batch * p.tokens();
        let max = points
            .iter()
            .filter(|q| q.row.spec_json == p.row.spec_json)
            .map(|q| q.train.batch * q.tokens())
            .max()
            .unwrap();
        assert_eq!(
            held[i],
            size == max,
            "{} b{} len {}",
            p.row.model,
            p.train.batch,
            p.length()
        );
    }
    assert_eq!(eval.predictions.len(), held.iter().filter(|h| **h).count());
    // Held-out predictions of the fitted table beat the rule of thumb on this synthetic device.
    let s = vramcal::fit::split::scores(eval.predictions.iter());
    assert!(
        s.fitted.mape < 2.0 && s.fitted.mape < s.seed_formula.mape,
        "{s:?}"
    );
}

/// A held-out point larger than every training point of its model (or of a model absent from
/// the training set) is flagged as beyond training; one inside the trained range is not.
#[test]
fn predictions_beyond_their_folds_training_range_are_flagged() {
    use vramcal::fit::split::{beyond_training, Prediction};
    let (points, _) = prepare(&synthetic_rows(0.0, 5));
    let size = |i: usize| points[i].train.batch * points[i].tokens();
    // one model's points, smallest and largest by batch x tokens
    let model = &points[0].row.spec_json;
    let mut same: Vec<usize> = (0..points.len())
        .filter(|&i| &points[i].row.spec_json == model)
        .collect();
    same.sort_by_key(|&i| size(i));
    let (small, large) = (same[0], *same.last().unwrap());
    assert!(size(small) < size(large));
    let middle = *same
        .iter()
        .find(|&&i| size(i) > size(small) && size(i) < size(large))
        .unwrap();
    let other = (0..points.len())
        .find(|&i| &points[i].row.spec_json != model)
        .unwrap();
    let pred = |point: usize, fold: usize| Prediction {
        point,
        fold,
        measured: 1.0,
        fitted: 1.0,
        literature: 1.0,
        seed: 1.0,
        time_measured: None,
        time_fitted: None,
    };
    let eval = Evaluation {
        scheme: "test".into(),
        // fold 0 was fitted on the model's smallest and largest points only
        predictions: vec![pred(middle, 0), pred(large, 1), pred(other, 0)],
        fitted_on: vec![vec![small, large], vec![small, middle]],
    };
    assert_eq!(beyond_training(&eval, &points), [false, true, true]);
}
