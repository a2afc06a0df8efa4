//! The image spec of `ublkctl add rbd`, as the `rbd` tool writes it:
//! `[POOL/[NAMESPACE/]]IMAGE[@SNAP]`, with pool `rbd` when left out.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    pub pool: String,
    pub namespace: Option<String>,
    pub image: String,
    pub snap: Option<String>,
}

/// The pool an image spec without one names (as for `rbd`).
pub const DEFAULT_POOL: &str = "rbd";

impl std::str::FromStr for ImageSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            format!("bad rbd image spec '{s}': {why} (expected [POOL/[NAMESPACE/]]IMAGE[@SNAP])")
        };
        let (path, snap) = match s.split_once('@') {
            Some((_, "")) => return Err(bad("empty snapshot name")),
            Some((_, snap)) if snap.contains(['@', '/']) => {
                return Err(bad("a snapshot name cannot hold '@' or '/'"))
            }
            Some((path, snap)) => (path, Some(snap.to_string())),
            None => (s, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad("empty pool, namespace or image name"));
        }
        if s.contains(|c: char| c.is_control()) {
            return Err(bad("control characters"));
        }
        let (pool, namespace, image) = match parts[..] {
            [image] => (DEFAULT_POOL, None, image),
            [pool, image] => (pool, None, image),
            [pool, ns, image] => (pool, Some(ns.to_string()), image),
            _ => return Err(bad("too many '/'")),
        };
        Ok(ImageSpec {
            pool: pool.to_string(),
            namespace,
            image: image.to_string(),
            snap,
        })
    }
}

impl fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/", self.pool)?;
        if let Some(ns) = &self.namespace {
            write!(f, "{ns}/")?;
        }
        f.write_str(&self.image)?;
        if let Some(snap) = &self.snap {
            write!(f, "@{snap}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_rbd_tools_image_specs() {
        let s: ImageSpec = "rbd/ns/img@s1".parse().unwrap();
        assert_eq!(
            s,
            ImageSpec {
                pool: "rbd".into(),
                namespace: Some("ns".into()),
                image: "img".into(),
                snap: Some("s1".into()),
            }
        );
        assert_eq!(s.to_string(), "rbd/ns/img@s1");
        let s: ImageSpec = "img".parse().unwrap();
        assert_eq!(s.to_string(), "rbd/img");
        assert_eq!("p/i".parse::<ImageSpec>().unwrap().pool, "p");
        for bad in [
            "", "p/", "/i", "p//i", "a/b/c/d", "p/i@", "p/i@a@b", "p/i@a/b",
        ] {
            let e = bad.parse::<ImageSpec>().unwrap_err();
            assert!(e.starts_with("bad rbd image spec"), "{bad}: {e}");
        }
    }
}
