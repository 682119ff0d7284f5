//! The dashboard's style sheet and script, embedded in the binary and served under names that
//! carry a hash of their content, so browsers may keep them for a year and still get a new
//! file the moment the binary changes.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

const CSS: &str = include_str!("assets/dashboard.css");
const JS: &str = include_str!("assets/dashboard.js");

/// One embedded file.
struct Asset {
    /// The URL path it is served at: `/assets/dashboard.HASH.css`.
    url: String,
    content: &'static str,
    content_type: &'static str,
}

static ASSETS: LazyLock<[Asset; 2]> = LazyLock::new(|| {
    [
        asset("dashboard", "css", CSS, "text/css; charset=utf-8"),
        asset("dashboard", "js", JS, "text/javascript; charset=utf-8"),
    ]
});

fn asset(stem: &str, ext: &str, content: &'static str, content_type: &'static str) -> Asset {
    // The hash only has to change when the content does; it is computed once per process.
    let mut hasher = DefaultHasher::new();
    content.hash(&mut hasher);
    Asset {
        url: format!(
            "/assets/{stem}.{:012x}.{ext}",
            hasher.finish() & 0xffff_ffff_ffff
        ),
        content,
        content_type,
    }
}

/// The URL of the style sheet.
pub fn css_url() -> &'static str {
    &ASSETS[0].url
}

/// The URL of the script.
pub fn js_url() -> &'static str {
    &ASSETS[1].url
}

/// `GET /assets/{file}`: an embedded file, cached for a year; 404 for any other name,
/// including an older hash.
pub async fn serve(Path(file): Path<String>) -> Response {
    let path = format!("/assets/{file}");
    match ASSETS.iter().find(|asset| asset.url == path) {
        Some(asset) => (
            [
                (CONTENT_TYPE, HeaderValue::from_static(asset.content_type)),
                (
                    CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=31536000, immutable"),
                ),
            ],
            asset.content,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            [(CACHE_CONTROL, HeaderValue::from_static("no-store"))],
            format!(
                "no asset {path}: this server serves {} and {}; reload the page\n",
                css_url(),
                js_url()
            ),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asset_urls_carry_a_content_hash() {
        assert!(css_url().starts_with("/assets/dashboard.") && css_url().ends_with(".css"));
        assert!(js_url().ends_with(".js"));
        assert_ne!(css_url(), js_url());
        let again = asset("dashboard", "css", CSS, "text/css");
        assert_eq!(again.url, css_url(), "the same content has the same name");
        let other = asset("dashboard", "css", "body {}", "text/css");
        assert_ne!(other.url, css_url());
    }
}
