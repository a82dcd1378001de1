"""Discovery: publish a mesh, find one, pick the best. Signed listings on Nostr relays and mDNS on the LAN.

    nostr       NIP-01 events, BIP-340 signatures, a relay client (publish, query)
    listing     the listing's content, its signing key, its checks, the score ``--auto`` uses
    mdns        listings on the LAN (zeroconf)
    directory   relays and LAN read and written as one; failures are warnings
    publisher   the node component that keeps a public mesh listed
"""

from meshllm.discovery.directory import DEFAULT_RELAYS, Directory
from meshllm.discovery.listing import Listing, ListingContent, choose, parse_listing, publishing_key, score
from meshllm.discovery.publisher import Publisher, PublishSettings

__all__ = ["DEFAULT_RELAYS", "Directory", "Listing", "ListingContent", "PublishSettings", "Publisher", "choose",
           "parse_listing", "publishing_key", "score"]
