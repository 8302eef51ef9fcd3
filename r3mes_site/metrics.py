"""R3MES's own Prometheus series (prefix r3mes_, base units). django-prometheus adds django_*.

They live in the default registry, so /metrics exports them with django-prometheus's series.
"""

from prometheus_client import Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

build_info = Info("r3mes_build", "R3MES version and backbone of this process")
time_to_first_token = Histogram(
    "r3mes_time_to_first_token_seconds", "Time from request to first generated token", buckets=LATENCY_BUCKETS
)
inter_token_latency = Histogram(
    "r3mes_inter_token_latency_seconds", "Time between consecutive generated tokens", buckets=TOKEN_LATENCY_BUCKETS
)
request_latency = Histogram(
    "r3mes_request_latency_seconds", "End-to-end latency of a generation request", buckets=LATENCY_BUCKETS
)
generated_tokens = Counter("r3mes_generated_tokens_total", "Tokens generated")
requests_running = Gauge("r3mes_requests_running", "Generation requests running in the inference worker")
requests_waiting = Gauge("r3mes_requests_waiting", "Generation requests waiting for a batch slot")
router_fast_path = Counter("r3mes_router_fast_path_total", "Requests routed by the keyword fast path")
router_requests = Counter("r3mes_router_requests_total", "Requests routed")
adapter_cache_hits = Counter("r3mes_adapter_cache_hits_total", "Adapter cache hits", ["tier"])
adapter_cache_misses = Counter("r3mes_adapter_cache_misses_total", "Adapter cache misses", ["tier"])
retrieval_latency = Histogram("r3mes_retrieval_latency_seconds", "RAG retrieval latency", buckets=LATENCY_BUCKETS)
jobs = Counter("r3mes_jobs_total", "Background jobs finished", ["job", "outcome"])
readiness_check_latency = Histogram(
    "r3mes_readiness_check_seconds", "Latency of each readiness check", ["check"], buckets=LATENCY_BUCKETS
)
readiness_check_failures = Counter("r3mes_readiness_check_failures_total", "Failed readiness checks", ["check"])
governance_votes = Counter("r3mes_governance_votes_total", "Governance votes cast or changed")
governance_deposits = Counter("r3mes_governance_deposits_total", "Governance deposits made")
governance_proposals_closed = Counter(
    "r3mes_governance_proposals_closed_total", "Proposals closed, by outcome", ["outcome"]
)

# --- Ledger and chain sync ---
ledger_transactions = Counter("r3mes_ledger_transactions_total", "Transactions recorded on this node's ledger", ["type"])
chain_sync_blocks = Counter("r3mes_chain_sync_blocks_total", "Peer blocks verified and stored by chain sync")
chain_sync_failures = Counter(
    "r3mes_chain_sync_failures_total", "Chain sync runs that stopped on an error", ["reason"]
)
chain_sync_blob_bytes = Counter("r3mes_chain_sync_blob_bytes_total", "Blob bytes fetched from peers and verified")
corrupt_blobs = Counter("r3mes_corrupt_blobs_total", "Blobs refused because their content does not match the CID", ["source"])
backbone_fetch_bytes = Counter("r3mes_backbone_fetch_bytes_total", "Backbone bytes downloaded", ["source"])
