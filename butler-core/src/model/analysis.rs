use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Id;
use crate::config::Config;

/// An analysis: a named piece of work (a study, a batch of articles) with its own config layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// Identifier printed by `create-analysis`.
    pub id: Id,
    /// Name; several analyses may share one.
    pub name: String,
    /// The analysis's start date.
    pub start_date: NaiveDate,
    /// The analysis's current config layer (between the workflow's and the run's).
    pub config_id: Uuid,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

/// What [`crate::RunStore::create_analysis`] stores.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAnalysis {
    /// Name.
    pub name: String,
    /// Start date.
    pub start_date: NaiveDate,
    /// The analysis's config layer, stored as a new config.
    pub config: Config,
}

/// Parses an analysis date written `YYYY-MM-DD` or, as Butler has always accepted,
/// `MM-DD-YYYY`.
pub fn parse_date(text: &str) -> crate::Result<NaiveDate> {
    let text = text.trim();
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .or_else(|_| NaiveDate::parse_from_str(text, "%m-%d-%Y"))
        .map_err(|_| {
            crate::Error::InvalidInput(format!(
                "bad date {text:?}: write it as YYYY-MM-DD (2024-03-31) or MM-DD-YYYY (03-31-2024)"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_date_forms_and_rejects_others() {
        let day = NaiveDate::from_ymd_opt(2024, 3, 31).unwrap();
        assert_eq!(parse_date("2024-03-31").unwrap(), day);
        assert_eq!(parse_date("03-31-2024").unwrap(), day);
        let err = parse_date("31/03/2024").unwrap_err().to_string();
        assert!(
            err.contains("31/03/2024") && err.contains("YYYY-MM-DD"),
            "{err}"
        );
        assert!(parse_date("2024-02-30").is_err());
    }
}
