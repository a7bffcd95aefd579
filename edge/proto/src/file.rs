//! The Traefik file-provider format.
