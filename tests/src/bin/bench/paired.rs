//! The table of paired ratios: for every round, a device's IOPS over its reference's IOPS
//! in the same round, then the median of those ratios, their spread and the rounds in
//! which the device was ahead.
//!
//! The main table divides medians taken over the whole run, so a machine that runs
//! faster in some rounds than in others (on the shared hosts, twofold between rounds of
//! one run) shifts both medians by different rounds. Pairing each round's result with the
//! reference's in the same round cancels that drift; the rounds ahead say how often the
//! device won, which a median alone hides.

/// `iops[row][dev][round]`; `refs` as in `compare`: (device index, column name).
pub fn print(labels: &[&str], row_names: &[&str], iops: &[Vec<Vec<f64>>], refs: &[(usize, &str)]) {
    println!();
    let mut header = format!("| {:<18} | {:<16} |", "workload", "device");
    let mut rule = format!("|{:-<20}|{:-<18}|", "", "");
    for (_, name) in refs {
        header.push_str(&format!(" {:>24} |", format!("{name}, by round")));
        rule.push_str(&format!("{:->25}:|", ""));
    }
    println!("{header}");
    println!("{rule}");
    for (r, name) in row_names.iter().enumerate() {
        for (d, label) in labels.iter().enumerate() {
            if refs.iter().any(|(i, _)| *i == d) {
                continue;
            }
            let mut line = format!("| {name:<18} | {label:<16} |");
            for (i, _) in refs {
                line.push_str(&format!(" {:>24} |", cell(&iops[r][d], &iops[r][*i])));
            }
            println!("{line}");
        }
    }
    println!(
        "median (min-max) of each round's IOPS over the reference's in that round, and the \
         rounds in which the device had more IOPS"
    );
}

/// "0.94x (0.71-1.20) 4/9" for the rounds both devices ran in.
fn cell(dev: &[f64], reference: &[f64]) -> String {
    let mut ratios: Vec<f64> = dev
        .iter()
        .zip(reference)
        .filter(|(_, r)| **r > 0.0)
        .map(|(d, r)| d / r)
        .collect();
    if ratios.is_empty() {
        return "-".into();
    }
    let ahead = ratios.iter().filter(|x| **x > 1.0).count();
    let n = ratios.len();
    // Sorts `ratios`, so the first and last are the spread.
    let median = super::table::median(&mut ratios);
    format!(
        "{median:.2}x ({:.2}-{:.2}) {ahead}/{n}",
        ratios[0],
        ratios[n - 1]
    )
}

#[cfg(test)]
mod tests {
    use super::cell;

    #[test]
    fn a_cell_pairs_rounds_not_medians() {
        // The device wins every round by 10%, whatever the machine's speed that round.
        let dev = [110.0, 220.0, 55.0];
        let reference = [100.0, 200.0, 50.0];
        assert_eq!(cell(&dev, &reference), "1.10x (1.10-1.10) 3/3");
        assert_eq!(
            cell(&[90.0, 300.0], &[100.0, 200.0]),
            "1.20x (0.90-1.50) 1/2"
        );
        assert_eq!(cell(&[], &[]), "-");
    }
}
