// Type declarations for eddy.js, the Eddy browser client. Wire protocol: docs/PROTOCOL.md.

/** Connection states. */
export type ConnectionState = "disconnected" | "connecting" | "connected" | "reconnecting" | "error";

export declare const STATES: readonly ConnectionState[];

/** Jitter applied to the backoff delay: "full" = [0, ceiling], "equal" = [ceiling/2, ceiling], "none" = ceiling. */
export type Jitter = "full" | "equal" | "none";

export type PresenceStatus = "online" | "away" | "busy" | "offline";

/** Event ids are store positions written in decimal. */
export type EventId = string;

export interface BackoffOptions {
  /** First delay ceiling in ms (default 1000). */
  baseDelay?: number;
  /** Cap of the delay ceiling in ms (default 32000). */
  maxDelay?: number;
  /** Default "equal". */
  jitter?: Jitter;
  /** A number in [0, 1), like Math.random (the default). */
  random?: () => number;
}

export declare const DEFAULTS: Readonly<{
  maxAttempts: 10;
  baseDelay: 1000;
  maxDelay: 32000;
  jitter: "equal";
  queueLimit: 100;
  sendRate: 40;
  sendBurst: 80;
  idleTimeout: 75000;
}>;

/** Upper bound of the delay before reconnection attempt `attempt` (1-based): baseDelay·2^(attempt−1), capped. */
export declare function backoffCeiling(attempt: number, options?: Pick<BackoffOptions, "baseDelay" | "maxDelay">): number;
/** [lowest, highest] delay that backoffDelay can return for `attempt`. */
export declare function backoffBounds(attempt: number, options?: Omit<BackoffOptions, "random">): [number, number];
/** The delay in ms before reconnection attempt `attempt` (1-based), jittered. */
export declare function backoffDelay(attempt: number, options?: BackoffOptions): number;
/** The delays of attempts 1..maxAttempts (default 10); after the last one the client gives up. */
export declare function backoffSchedule(maxAttempts?: number, options?: BackoffOptions): number[];
/** What the client does after a close code: stop (4029), refresh the token (4003), go now (1001) or retry with backoff. */
export declare function closePolicy(code: number): "stop" | "refresh" | "now" | "retry";
/** Compare two event ids: negative, 0 or positive. */
export declare function compareIds(a: EventId | number, b: EventId | number): number;
/** The socket URL with the token as `access_token` (ws:/wss:; relative URLs resolve against `base`). */
export declare function socketUrl(url: string, token?: string | null, base?: string): string;
/** `/api/stats` on the socket's server, used to tell a refused token from a network failure. */
export declare function probeUrl(url: string, base?: string): string;

/** An error with the protocol's code: FORBIDDEN, HISTORY_LOST, TOKEN_EXPIRED… or one of the client's own:
 *  DROPPED (offline queue full), DISCONNECTED, MAX_ATTEMPTS, TOO_MANY_CONNECTIONS, TOKEN_PROVIDER, CLOSED, LEFT. */
export declare class EddyError extends Error {
  constructor(code: string, message?: string, frame?: ErrorFrame | null);
  readonly name: "EddyError";
  code: string;
  /** The error frame from the server, or for DROPPED the frame that was dropped. */
  frame: ErrorFrame | OutgoingFrame | null;
}

// Frames ----------------------------------------------------------------------------------

export interface ConnectedFrame {
  type: "connected";
  connection_id: string;
  user_id: string;
  tenant: string;
  /** Automatic rooms (user:<sub>, tenant, role:<role>) and the path channel of /ws/<channel>/stream. */
  channels: string[];
  timestamp: string;
  ref?: string | number;
}

export interface EventFrame<T = unknown> {
  type: "event";
  id: EventId;
  channel: string;
  event: string;
  timestamp: string;
  data: T;
  /** Scheduled events: when they were due and how late they went out. */
  meta?: { scheduled_for?: string; late?: boolean; late_ms?: number; [key: string]: unknown };
}

export interface AckFrame {
  type: "ack";
  ref: string | number | null;
  channel?: string;
  /** publish acks */
  id?: EventId;
  timestamp?: string;
  /** presence acks */
  status?: PresenceStatus;
  /** authenticate (token refresh) acks */
  expires_at?: string | null;
}

export interface JoinAck extends AckFrame {
  channel: string;
  /** True when `since` was too old (HISTORY_LOST): the room was joined live instead; reload its history. */
  historyLost?: boolean;
}

export interface PublishAck extends AckFrame {
  channel: string;
  id: EventId;
  timestamp: string;
}

export interface ErrorFrame {
  type: "error";
  ref: string | number | null;
  code: string;
  error: string;
}

export interface TypingFrame {
  type: "typing";
  channel: string;
  user_id: string;
  is_typing: boolean;
}

export interface ReadFrame {
  type: "read";
  channel: string;
  user_id: string;
  message_id: string;
  read_at: string;
}

export interface PresenceFrame {
  type: "presence";
  channel: string;
  user_id: string;
  status: PresenceStatus;
  timestamp: string;
}

export interface PresenceData {
  type: "presence_data";
  ref: string | number;
  channel: string;
  users: { user_id: string; status: PresenceStatus; connections: number }[];
}

export interface SyncData {
  type: "sync_data";
  ref: string | number;
  channel: string;
  events: EventFrame[];
  count: number;
  has_more: boolean;
}

export interface PongFrame {
  type: "pong";
  timestamp: string;
  ref?: string | number;
}

export interface ReconnectFrame {
  type: "reconnect";
  reason: string;
}

export type ServerFrame =
  | ConnectedFrame | EventFrame | AckFrame | ErrorFrame | TypingFrame | ReadFrame | PresenceFrame | PresenceData
  | SyncData | PongFrame | ReconnectFrame | { type: "keepalive"; timestamp: string } | { type: string; [key: string]: unknown };

export interface OutgoingFrame {
  type: string;
  ref?: string | number;
  [key: string]: unknown;
}

// Client events ----------------------------------------------------------------------------

export interface StateChange {
  state: ConnectionState;
  previous: ConnectionState;
  /** Failed attempts since the last successful connection. */
  attempt: number;
  maxAttempts: number;
  /** ms until the next reconnection attempt (for a countdown); null when no retry is scheduled. */
  delay: number | null;
  /** Date.now() of the next attempt, or null. */
  retryAt: number | null;
  reason: string | null;
  /** The WebSocket close code that led here, if any. */
  code: number | null;
  /** With state "error": why the client gave up (MAX_ATTEMPTS, TOKEN_EXPIRED, TOKEN_INVALID, TOO_MANY_CONNECTIONS…). */
  error: string | null;
}

export interface DroppedFrame {
  frame: OutgoingFrame;
  reason: "queue full";
  queueLimit: number;
}

export interface EddyEvents {
  state: StateChange;
  connected: ConnectedFrame;
  /** Every stored event of every subscribed channel, once (duplicates of a resume are dropped). */
  event: EventFrame;
  /** An event frame dropped because its id was already delivered (overlap of a resume). */
  duplicate: EventFrame;
  typing: TypingFrame;
  read: ReadFrame;
  presence: PresenceFrame;
  error: EddyError;
  dropped: DroppedFrame;
  /** The server asked clients to go (it is shutting down); the client reconnects at once. */
  reconnect: ReconnectFrame;
  ack: AckFrame;
  /** Every frame received, before the client handles it. */
  frame: ServerFrame;
}

export type EventName = keyof EddyEvents | `event:${string}`;
export type Listener<K extends EventName> = (payload: K extends keyof EddyEvents ? EddyEvents[K] : EventFrame) => void;

export interface EddyOptions extends Omit<BackoffOptions, "random"> {
  /** Socket URL, absolute (ws://, wss://, http(s):// is converted) or relative to the page; default "/ws". */
  url?: string;
  /** A fixed token (JWT). Use tokenProvider to refresh tokens. */
  token?: string | null;
  /** Called (sync or async) before every connection attempt and when the server reports TOKEN_EXPIRED. */
  tokenProvider?: () => string | null | undefined | Promise<string | null | undefined>;
  /** Consecutive failed reconnection attempts before giving up with state "error" (default 10). */
  maxAttempts?: number;
  /** Frames kept while offline (default 100); beyond it the oldest is dropped with a "dropped" event. */
  queueLimit?: number;
  /** Frames per second the client sends at most (default 40, under the server's 50). */
  sendRate?: number;
  /** Burst of frames sent at once (default 80, under the server's 100). */
  sendBurst?: number;
  /** ms without any frame before the link is considered dead (default 75000; it pings at half). 0 = off. */
  idleTimeout?: number;
  /** WebSocket class to use (tests inject a fake). */
  WebSocket?: new (url: string) => WebSocket;
  /** Random source for the jitter. */
  random?: () => number;
  /** URL asked with the token after a failed handshake to tell a refused token (401) from a network
   *  failure; default `/api/stats` of the socket's server; null disables. */
  authProbeUrl?: string | null;
  /** fetch implementation for the probe. */
  fetch?: typeof fetch;
}

export interface JoinOptions {
  /** Replay every stored event after this id first, then live events. */
  since?: EventId | number | null;
}

export interface PublishOptions {
  /** A retry with the same key stores nothing new. One is generated when omitted. */
  idempotencyKey?: string;
}

export declare class Eddy {
  constructor(options?: EddyOptions);

  readonly state: ConnectionState;
  /** Failed attempts since the last successful connection. */
  readonly attempt: number;
  readonly maxAttempts: number;
  /** Date.now() of the next reconnection attempt, or null. */
  readonly retryAt: number | null;
  /** The last `connected` frame. */
  readonly user: ConnectedFrame | null;
  /** This client's presence status, restored after every reconnect. */
  readonly status: PresenceStatus;
  readonly connected: boolean;
  /** Channels joined (or being joined). */
  readonly channels: string[];
  /** Frames waiting to be sent. */
  readonly queued: number;

  /** Open the connection and keep it open. Resolves when connected; rejects when the client gives up. */
  connect(): Promise<void>;
  /** Close for good (until connect() again). Queued frames stay queued; rooms stay remembered. */
  close(): void;

  /** Subscribe; re-joined on every reconnect with `since` = the last event id seen on it. */
  join(channel: string, options?: JoinOptions): Promise<JoinAck>;
  /** Unsubscribe and stop re-joining. Resolves with the ack, or null when there was nothing to tell the server. */
  leave(channel: string): Promise<AckFrame | null>;
  /** Store and broadcast an event over the socket (needs a channel rule that allows it). Queued while offline. */
  publish<T = unknown>(channel: string, event: string, data?: T, options?: PublishOptions): Promise<PublishAck>;
  /** Typing indicator; fire and forget (queued while offline). */
  typing(channel: string, isTyping?: boolean): void;
  /** Read receipt. */
  read(channel: string, messageId: EventId | number): Promise<AckFrame>;
  /** Set this connection's presence status in every joined channel. */
  presence(status: PresenceStatus): Promise<AckFrame>;
  /** Who is online in a channel. */
  presenceQuery(channel: string): Promise<PresenceData>;
  /** Events after `lastId` (at most 1000) without subscribing. */
  sync(channel: string, lastId?: EventId | number): Promise<SyncData>;
  /** Round trip to the server. */
  ping(): Promise<PongFrame>;
  /** The last event id seen on a channel, or null. */
  lastEventId(channel: string): EventId | null;

  /** Add a listener; returns a function that removes it. `event:<name>` listens to one event name. */
  on<K extends EventName>(name: K, listener: Listener<K>): () => void;
  off<K extends EventName>(name: K, listener: Listener<K>): void;
}

export default Eddy;
