//! The Traefik rule language.
