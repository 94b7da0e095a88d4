//! Operations on a store: reclaiming abandoned staging, verification, space reclamation (being written).
