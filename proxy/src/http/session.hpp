#pragma once
// One HTTP client connection (a session) and the transactions it carries. The session is
// one class whose member functions live in the files of this folder, by concern:
//   connection.cpp  the connection loop: TLS handshake, keep-alive, parking, drain, and the
//                   client watch while an answer is pending
//   phases.cpp      one request's head phases: read head -> filter -> (forms pages) ->
//                   authenticate -> decide -> rewrite -> chunked probe, each a short
//                   function over the request's context
//   forms.cpp       the forms-login pages and session cookies, built as replies
//   relay.cpp       upstream -> answer: pick the upstream connection (pinned, pooled, new),
//                   send the head, read the answer's head, and finish the transaction (log)
//   pump.cpp        the body pumps, client -> upstream and upstream -> client
// Runtime sources only: this header brings Asio.
#include <optional>

#include "dmz/proxy/http/parser.hpp"
#include "fault.hpp"
#include "runtime.hpp"
#include "auth/forms_cookie.hpp"

namespace dmz::proxy {

using clock_type = std::chrono::steady_clock;

/// The request body's pump, running beside the response: its outcome, and a timer to wait on.
struct pump_signal {
    explicit pump_signal(net::asio::any_io_executor ex) : timer(ex) { timer.expires_at(clock_type::time_point::max()); }
    net::asio::steady_timer timer;
    bool done = false;
    bool ok = false;
    std::uint64_t bytes = 0;
    /// Set when the client broke the body's framing or limit: the client's fault, not the
    /// upstream's, whatever the upstream read then reports.
    std::optional<rules::fault> client_fault;
    /// The client's connection ended (or failed) before the body did.
    bool client_stopped = false;
};

/// A response this tier makes itself (a fault page, a login page, a redirect). An empty
/// `wire` writes nothing: the transaction ends with the connection (its record says why).
struct local_reply {
    std::string wire;  ///< the whole response
    int status = 0;
    bool keep = false;  ///< the connection may carry another request afterwards
};

/// Where the upstream connection of a transaction came from.
enum class upstream_use : std::uint8_t { none, fresh, reused, pinned };
const char* to_string(upstream_use u);

/// What the head phases learn about one request. Lives in admit()'s frame: gone before a
/// request waits upstream.
struct admission {
    bool http10 = false;
    bool keep_if_refused = false;  ///< keep-alive, and no body to skip
    std::string host;              ///< Host without port, lower case
    rules::ip_address client;      ///< the peer, or what a trusted previous tier saw
    // identity
    bool forms = false;      ///< a forms listener with a session sealer
    bool validates = false;  ///< this listener checks Basic credentials itself
    std::string user;        ///< authenticated, or ""
    std::vector<std::string> groups;
    bool have_session = false;
    forms_session session;
    std::string session_problem;  ///< why a presented session cookie was refused
    std::string_view authorization;
    // rules
    rules::decision d;
    bool strip_security_token = false;
};

/// A request to one of the forms listener's own pages, copied out of its head (the page
/// may read a body into the buffer the head lived in).
struct forms_request {
    bool login = false;  ///< the login page (else a logout)
    std::string method, target, content_type, cookie;
    http::body_kind body = http::body_kind::none;
    std::uint64_t length = 0;
    bool keep = false, http10 = false;
};

/// The transaction in hand: what the head phases decided, for the relay to carry out. A
/// member, since it outlives the phases' frames (an ActiveSync Ping waits upstream for
/// minutes with only run()'s frame alive).
struct transaction_context {
    access_record rec;
    clock_type::time_point t0{};
    const rules::rule* rule = nullptr;
    const rules::target* to = nullptr;
    std::string head_out, method;
    http::body_kind body = http::body_kind::none;
    std::uint64_t content_length = 0;
    bool expect_continue = false, auth_on_connection = false, client_keep_alive = true, http10 = false;
    upstream_use use = upstream_use::none;
    std::shared_ptr<upstream_conn> up;  ///< relay() sent the request on it
    std::shared_ptr<pump_signal> sig;   ///< the request body's pump
    bool up_until_close = false;        ///< the answer's body ends when the upstream closes
};

class http_session : public std::enable_shared_from_this<http_session> {
public:
    http_session(worker& w, std::shared_ptr<const instance_runtime> rt, const listener_runtime& l, std::string endpoint,
                 net::tcp::socket s);
    /// A parked connection whose client spoke again: the same connection (id, peer, TLS
    /// session), judged by the snapshot current now.
    http_session(worker& w, std::shared_ptr<const instance_runtime> rt, const listener_runtime& l, parked_connection&& c,
                 net::stream s);
    ~http_session();
    void start();
    /// The instance drains: an idle keep-alive connection closes now; one with a request in
    /// flight finishes it, answers with Connection: close, and closes.
    void drain();

private:
    template <class T = void>
    using task = net::task<T>;
    using error_code = net::error_code;
    using reply = std::optional<local_reply>;  ///< a phase's outcome: nullopt goes on
    /// What run() does next with the transaction in hand.
    enum class stage : std::uint8_t { none, relay, answer };

    const rules::listener& lcfg() const { return *l_->cfg; }

    // ---- connection.cpp: the connection loop --------------------------------------------
    bool adopt(std::shared_ptr<const instance_runtime> next);
    task<> run();
    /// Waits for the next request's first bytes. False: the session ends; `parked` when it
    /// ended because the connection went to the parking lot.
    task<bool> await_request(bool first, bool& readable, bool& parked);
    bool park();
    void watch_soon(const std::shared_ptr<upstream_conn>& up, const std::shared_ptr<pump_signal>& request);
    void watch_now();
    void maybe_watch(const std::shared_ptr<upstream_conn>& up, const pump_signal& request);
    void spawn_watch(const std::shared_ptr<upstream_conn>& up);
    task<> watch(std::shared_ptr<upstream_conn> up, std::shared_ptr<pump_signal> sig);
    task<> stop_watch();

    // ---- phases.cpp: one request's head phases ------------------------------------------
    /// One request: its head phases, then either a reply sent here or stage::relay for
    /// run(). `readable`: the client's socket has just shown bytes (read them, do not wait
    /// again). False: the connection ends.
    task<bool> transaction(bool first, bool readable);
    /// Phase 1: a whole head parsed into `head`, or a refusal, or nullopt with `gone` when
    /// the client left.
    task<reply> read_head(http::request_head& head, bool first, bool readable, bool& gone);
    http::limits head_limits() const;
    /// Phases 2-6 over a parsed head; nullopt: the transaction goes upstream.
    task<reply> admit(http::request_head& head);
    /// Phase 2: loops, the client's address, the HTTPS redirect.
    reply filter(const http::request_head& head, admission& a);
    /// Phase 3: who is asking (a forms session, Basic credentials).
    task<reply> authenticate(const http::request_head& head, admission& a);
    /// What the rules are told about this request: client, SNI, host, method, target, user.
    rules::facts facts_of(const http::request_head& head, const admission& a) const;
    /// Phase 4: the rules, the Exchange guards and the body limit.
    reply decide(const http::request_head& head, admission& a);
    /// Phase 5: the head toward the upstream, into tx_; the client's head is done with.
    void rewrite(http::request_head& head, const admission& a);
    /// Phase 6: a chunked body's first size line, checked before anything goes upstream.
    task<reply> probe_chunked();
    /// A refusal of this transaction: the fault page, and the fault on the record.
    local_reply refusal(const rules::fault& f, bool keep, bool http10);
    /// Writes a reply this tier made (status and bytes on the record).
    task<bool> write_reply(const local_reply& r);
    /// write_reply, then the access-log line.
    task<bool> send(const local_reply& r);
    void log_transaction();
    access_record new_record() const;

    // ---- forms.cpp: the forms-login pages -----------------------------------------------
    /// Whether the head asks for one of the forms listener's own pages.
    bool forms_page_path(const http::request_head& head, bool& login) const;
    forms_request forms_request_of(const http::request_head& head, bool login) const;
    task<reply> forms_page(const forms_request& q, const admission& a);
    local_reply logout_page(const forms_request& q);
    local_reply login_page(const forms_request& q);
    task<reply> login(const forms_request& q, const admission& a);
    /// A browser without a session on a forms listener: to the login page.
    local_reply login_redirect(const http::request_head& head, const admission& a);
    std::string check_session(const std::string& value, forms_session& s, std::vector<std::string>* groups = nullptr);
    std::string cookie_attributes() const;
    std::string session_cookie(const forms_session& s) const;
    std::string expired_cookie() const;
    std::string page(int status, const std::string& title, const std::string& inner, bool keep, bool http10,
                     const std::string& extra_fields = {}) const;
    std::string login_form(const std::string& back, const std::string& message) const;
    task<bool> read_exactly(std::size_t n);

    // ---- relay.cpp: upstream and answer -------------------------------------------------
    /// An upstream connection (pinned, pooled or new), the head sent, the body's pump
    /// started; then stage::answer.
    task<bool> relay();
    enum class take : std::uint8_t { ok, pinned_gone, failed };
    /// Phase 7: the upstream connection for this transaction into tx_.up.
    task<take> take_upstream(bool has_body, rules::fault& f);
    void start_request_pump();
    /// Phase 8: the upstream's answer toward the client. `waited`: run() already waited
    /// for the upstream to become readable, with `wait_ec` as the outcome.
    task<bool> answer(error_code wait_ec, bool waited);
    /// The answer's head (1xx handled); false when the transaction ended (a fault was sent).
    task<bool> read_response_head(http::response_head& resp, error_code wait_ec, bool waited);
    /// A refusal in mid-relay (the connection closes after it; finish() logs).
    task<> write_refusal(const rules::fault& f);
    /// What the upstream's failure to answer becomes for the client.
    task<> answer_upstream_failure(error_code ec);
    /// The response head toward the client, with what of the body came with it.
    task<bool> send_response_head(http::response_head& resp, bool& close_client, http::body_kind& body,
                                  std::uint64_t& length);
    enum class fate : std::uint8_t { close, pool, pin };
    /// The one exit of a relayed transaction: stop the request pump if it still runs,
    /// decide what becomes of the upstream connection, log.
    task<bool> finish(bool keep_client, fate f);
    static std::string pool_key(const rules::target& to);

    // ---- pump.cpp: the bodies -----------------------------------------------------------
    task<bool> pump_response(http::body_kind kind, std::uint64_t length, bool chunk_to_client);
    task<bool> pump_response_raw(http::body_kind kind, std::uint64_t length);
    task<bool> pump_response_chunked(bool chunk_to_client);
    task<bool> read_upstream_more(error_code& ec);
    /// A failure after the answer's head went out (nothing more can be said to the client):
    /// on the record, unless an earlier cause is there already.
    void fail_late(rules::fault f);
    void client_write_failed(const error_code& ec);
    /// The answer's body stopped coming: an upstream timeout or protocol fault.
    void upstream_body_failed(const error_code& ec);
    /// Client -> upstream body. Runs beside the response; signals when done.
    task<> pump_request(std::shared_ptr<upstream_conn> up, std::shared_ptr<pump_signal> sig, http::body_kind kind,
                        std::uint64_t length, std::chrono::milliseconds idle, std::uint64_t limit);
    task<bool> pump_request_length(upstream_conn& up, pump_signal& sig, std::uint64_t length, std::chrono::milliseconds idle);
    task<bool> pump_request_chunked(upstream_conn& up, pump_signal& sig, std::chrono::milliseconds idle, std::uint64_t limit);
    task<bool> read_client_more(pump_signal& sig, std::chrono::milliseconds idle, error_code& ec);

    worker& w_;
    std::shared_ptr<const instance_runtime> rt_;
    const listener_runtime* l_;
    std::string endpoint_;    ///< the listening address that accepted this connection
    std::string counted_as_;  ///< the listener whose open-connection gauge counts this one
    net::stream down_;
    net::watchdog down_dog_;
    std::uint64_t id_;
    rules::ip_address peer_;
    std::string peer_text_;
    bool trusted_peer_ = false;  ///< the previous tier (trust_forwarded_from)
    std::string sni_;
    flat_buffer in_{4096};
    std::shared_ptr<upstream_conn> pinned_;
    std::string set_cookie_;  ///< a refreshed forms-session cookie for the next response
    // The client watcher: while this tier waits on the upstream with the request complete,
    // a read on the client notices it leaving (a phone dropping an ActiveSync Ping, Outlook
    // closing an RPC_OUT_DATA channel) and frees the upstream at once.
    bool watching_ = false;
    bool client_gone_ = false;
    bool idle_ = false;  ///< waiting for the next request (a drain closes the connection now)
    std::shared_ptr<pump_signal> watch_sig_;
    const rules::target* key_of_ = nullptr;  ///< the target `key_` and `target_text_` describe
    std::string key_, target_text_;
    struct later final : net::deadline {
        later(net::asio::io_context& io, http_session& s) : deadline(io), session(s) {}
        void fire() override { session.watch_now(); }
        http_session& session;
    };
    static constexpr std::chrono::milliseconds watch_delay{200};
    later watch_later_{w_.io, *this};
    struct park_timer final : net::deadline {
        park_timer(net::asio::io_context& io, http_session& s) : deadline(io), session(s) {}
        void fire() override {
            if (!session.idle_) return;
            session.parking_ = true;
            session.down_.cancel();
        }
        http_session& session;
    };
    park_timer park_later_{w_.io, *this};
    clock_type::time_point idle_since_{};
    bool parking_ = false;  ///< the idle wait was cancelled to park the connection
    bool parked_ = false;   ///< handed to the parking lot (which now counts it)
    transaction_context tx_;  ///< the transaction in hand
    stage next_ = stage::none;
    std::optional<net::watchdog> up_dog_;  ///< the upstream read deadline while an answer is awaited
    bool resumed_ = false;      ///< came back from the parking lot
    std::uint32_t served_ = 0;  ///< transactions this session object has run
    std::shared_ptr<upstream_conn> watch_up_;
    std::shared_ptr<pump_signal> watch_req_;
    std::uint64_t watch_gen_ = 0;  ///< the client watch's peek now running (see maybe_watch)
    char watch_peek_ = 0;
};

/// Field vectors of heads already re-serialized, kept per worker thread for the next head.
void borrow_fields(std::vector<http::field>& f);
/// Takes `f`'s memory back to the spares, leaving `f` with none.
void return_fields(std::vector<http::field>& f);

/// A head's field vector on loan from the spares, back when the head is done with (or at
/// the latest when the loan ends): a request costs no allocation for its heads' fields, and
/// a request waiting for its answer holds none.
struct fields_loan {
    std::vector<http::field>& fields;
    ~fields_loan() { return_fields(fields); }
};

}  // namespace dmz::proxy
