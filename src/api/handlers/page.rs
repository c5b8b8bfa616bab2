//! Pagination of the list routes: `?limit=&offset=` (both optional; `limit` 1 to
//! [`MAX_LIMIT`]). Without `limit` a route answers what it answered before pagination
//! (the console and the CLI read whole lists). The body stays a JSON array; the headers
//! carry the rest:
//!
//! ```text
//! X-Total-Count: 250                                   entries in the whole list
//! Link: </api/v1/backups?vault=v&limit=100&offset=100>; rel="next"   only when more follow
//! ```

use axum::http::{HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{R, bad};

/// The largest `limit` a caller may ask for.
pub const MAX_LIMIT: usize = 1000;

/// `?limit=&offset=` alone: the query of a list route that takes no filter (any other
/// parameter is refused, naming it).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    pub limit: Option<usize>,
    pub offset: Option<usize>,
}

/// A checked page: which entries of a list to answer.
#[derive(Clone, Copy, Debug)]
pub struct Page {
    pub limit: Option<usize>,
    pub offset: usize,
}

impl Page {
    /// Check `limit` (1 to [`MAX_LIMIT`]) and take `offset` (default 0).
    pub fn new(limit: Option<usize>, offset: Option<usize>) -> R<Page> {
        if let Some(l) = limit
            && !(1..=MAX_LIMIT).contains(&l)
        {
            return Err(bad(format!(
                "limit={l} is out of range: give 1 to {MAX_LIMIT} (and offset= for later pages)"
            )));
        }
        Ok(Page {
            limit,
            offset: offset.unwrap_or(0),
        })
    }

    /// The entries of `all` this page holds.
    pub fn slice<'a, T>(&self, all: &'a [T]) -> &'a [T] {
        let start = self.offset.min(all.len());
        let end = match self.limit {
            Some(l) => start.saturating_add(l).min(all.len()),
            None => all.len(),
        };
        &all[start..end]
    }

    /// `X-Total-Count: total` and, when entries follow this page, `Link: <…>; rel="next"`
    /// (the request's own query with the next `offset`), on `resp`.
    pub fn headers(&self, uri: &Uri, total: usize, mut resp: Response) -> Response {
        let h = resp.headers_mut();
        h.insert("x-total-count", HeaderValue::from(total));
        if let Some(l) = self.limit
            && self.offset.saturating_add(l) < total
        {
            let mut q: Vec<String> = uri
                .query()
                .unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty() && !p.starts_with("offset=") && !p.starts_with("limit="))
                .map(str::to_owned)
                .collect();
            q.push(format!("limit={l}"));
            q.push(format!("offset={}", self.offset + l));
            let link = format!("<{}?{}>; rel=\"next\"", uri.path(), q.join("&"));
            if let Ok(v) = HeaderValue::from_str(&link) {
                h.insert(header::LINK, v);
            }
        }
        resp
    }

    /// The page of `all` as a JSON array with its headers.
    pub fn answer<T: serde::Serialize>(&self, uri: &Uri, all: &[T]) -> Response {
        let resp = axum::Json(self.slice(all)).into_response();
        self.headers(uri, all.len(), resp)
    }
}

/// `GET …?limit=&offset=` on a route without filters.
pub fn page_of(q: PageQuery) -> R<Page> {
    Page::new(q.limit, q.offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_cut_from_the_list_and_links_the_next_one() {
        let all: Vec<u32> = (0..250).collect();
        let p = Page::new(Some(100), Some(200)).unwrap();
        assert_eq!(p.slice(&all), &all[200..250]);
        assert_eq!(
            Page::new(Some(100), Some(900)).unwrap().slice(&all).len(),
            0
        );
        assert_eq!(Page::new(None, None).unwrap().slice(&all).len(), 250);
        assert!(Page::new(Some(0), None).is_err());
        assert!(Page::new(Some(MAX_LIMIT + 1), None).is_err());
        let uri: Uri = "/api/v1/backups?vault=v&limit=100".parse().unwrap();
        let r = Page::new(Some(100), None).unwrap().answer(&uri, &all);
        assert_eq!(r.headers()["x-total-count"], "250");
        assert_eq!(
            r.headers()[header::LINK],
            "</api/v1/backups?vault=v&limit=100&offset=100>; rel=\"next\""
        );
        let last = Page::new(Some(100), Some(200)).unwrap().answer(&uri, &all);
        assert!(last.headers().get(header::LINK).is_none());
    }
}
