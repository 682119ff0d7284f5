//! API tokens of the HTTP server.

use butler_core::model::{ApiToken, NewToken};
use butler_core::{Error, Kind, Result};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{Decoded, PgStore, from_ms, now_ms, sqlstate};

impl PgStore {
    /// [`butler_core::RunStore::create_token`].
    pub(super) async fn insert_token(&self, token: NewToken) -> Result<ApiToken> {
        let created_at = now_ms();
        let done = sqlx::query(
            "INSERT INTO api_tokens (name, hash, read_only, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&token.name)
        .bind(&token.hash)
        .bind(token.read_only)
        .bind(created_at)
        .execute(&self.pool)
        .await;
        match done {
            Ok(_) => Ok(ApiToken {
                name: token.name,
                read_only: token.read_only,
                created_at: from_ms(created_at).map_err(|e| self.corrupt("a token", e))?,
            }),
            Err(e) if sqlstate(&e) == Some("23505") => Err(Error::token_exists(&token.name)),
            Err(e) => Err(self.fail(&format!("store token {}", token.name), e)),
        }
    }

    /// [`butler_core::RunStore::find_token`].
    pub(super) async fn select_token(&self, hash: &str) -> Result<Option<ApiToken>> {
        let row = sqlx::query("SELECT name, read_only, created_at FROM api_tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail("look up a token", e))?;
        row.as_ref()
            .map(token_from_row)
            .transpose()
            .map_err(|e| self.corrupt("a token", e))
    }

    /// [`butler_core::RunStore::list_tokens`].
    pub(super) async fn select_tokens(&self) -> Result<Vec<ApiToken>> {
        let rows = sqlx::query("SELECT name, read_only, created_at FROM api_tokens ORDER BY name")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.fail("list the tokens", e))?;
        rows.iter()
            .map(token_from_row)
            .collect::<Decoded<Vec<_>>>()
            .map_err(|e| self.corrupt("a token", e))
    }

    /// [`butler_core::RunStore::delete_token`].
    pub(super) async fn remove_token(&self, name: &str) -> Result<()> {
        let done = sqlx::query("DELETE FROM api_tokens WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(|e| self.fail(&format!("delete token {name}"), e))?;
        if done.rows_affected() == 0 {
            return Err(Error::not_found(Kind::Token, name));
        }
        Ok(())
    }
}

fn token_from_row(row: &PgRow) -> Decoded<ApiToken> {
    Ok(ApiToken {
        name: row.try_get("name")?,
        read_only: row.try_get("read_only")?,
        created_at: from_ms(row.try_get("created_at")?)?,
    })
}
